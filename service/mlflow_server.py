"""The embedded MLflow tracking server, in one process (``dst serve`` and ``dst demo`` start it).

``mlflow server`` works in two processes: its command line imports MLflow, prepares the
backend store and the server's environment, then starts uvicorn as a second Python process,
which imports MLflow all over again before it answers (about 6 s of a 12 s start on two
cores). Here MLflow's own command runs unchanged, except that the uvicorn it would start as a
child runs in this process, with the same arguments and environment: the store, the
configuration and the app are MLflow's, and the server answers seconds sooner. A command
MLflow builds that is not a uvicorn server is started as MLflow would start it.

    python -m service.mlflow_server [mlflow server options]
"""

from __future__ import annotations

import os
import sys
from typing import Any


class _Ended:
    """What MLflow's command waits on once the in-process server has stopped."""

    pid = os.getpid()
    returncode = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def send_signal(self, signum: int) -> None:
        pass


def uvicorn_arguments(cmd: list[str]) -> list[str] | None:
    """The uvicorn options of ``cmd`` when it is ``python -m uvicorn ...``, else None."""
    if len(cmd) > 3 and cmd[1:3] == ["-m", "uvicorn"]:
        return cmd[3:]
    return None


def main(argv: list[str] | None = None) -> None:
    import mlflow.server
    from mlflow.cli import cli

    spawn = mlflow.server._exec_cmd

    def serve_here(cmd: list[str], *, extra_env: dict[str, str] | None = None, **kw: Any) -> Any:
        args = uvicorn_arguments(cmd)
        if args is None:
            return spawn(cmd, extra_env=extra_env, **kw)
        os.environ.update(extra_env or {})
        from uvicorn.main import main as uvicorn

        uvicorn.main(args=args, standalone_mode=False)  # returns when the server has stopped
        return _Ended()

    mlflow.server._exec_cmd = serve_here
    cli.main(args=["server", *(sys.argv[1:] if argv is None else argv)], prog_name="mlflow")


if __name__ == "__main__":
    main()
