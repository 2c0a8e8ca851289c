"""Submitting experiments to Ray as Ray Jobs (Jobs API), one job per experiment.

The job's ``submission_id`` is the experiment id, so a retried submission can never start the
same experiment twice: Ray rejects a second job with that id and we treat it as already done.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.config import Settings
from service.states import JobStatus

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)
# `ray job stop` sends the driver SIGINT (Tune's graceful stop: trials stop, state is saved)
# and waits this long before killing it.
# Ray's `uv run` hook would upload the working directory (with its .venv) to every worker;
# the cluster's workers already have the environment.
JOB_ENV = {
    "RAY_JOB_STOP_SIGNAL": "SIGINT",
    "RAY_JOB_STOP_WAIT_TIME_S": "60",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


MLFLOW_CREDENTIALS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# what only the job driver may know: never in the job's runtime environment, which Ray keeps
# with the job and shows to anyone who can list jobs; handed over in a file instead
DRIVER_SECRETS = (
    "DST_DATABASE_URL",
    "DST_MLFLOW_TRACKING_URI",  # a tracking URI may carry credentials
    "MLFLOW_TRACKING_URI",
    *MLFLOW_CREDENTIALS,
)
SECRETS_FILE_ENV = "DST_DRIVER_SECRETS_FILE"
# with secrets from the head: the names of the secrets the driver must find in its environment
HEAD_SECRETS_ENV = "DST_DRIVER_SECRETS_FROM_HEAD"
# what the job driver gets and Ray workers must not (the driver scrubs them from the job)
DRIVER_ONLY_ENV = (
    *DRIVER_SECRETS,
    "DST_STORAGE_PATH",
    "DST_RAY_NODES_WAIT_S",
    SECRETS_FILE_ENV,
    HEAD_SECRETS_ENV,
)


def driver_env(settings: Settings) -> dict[str, str]:
    """The environment of an experiment's job driver: where to record, and nothing else."""
    uri = settings.mlflow_tracking_uri or ""
    env = {
        "DST_DATABASE_URL": settings.database_url,
        "DST_STORAGE_PATH": str(settings.storage_path),
        "DST_MLFLOW_TRACKING_URI": uri,
        "MLFLOW_TRACKING_URI": uri,
    }
    env |= {name: os.environ[name] for name in MLFLOW_CREDENTIALS if name in os.environ}
    if settings.data_dir is not None:  # where trials read data (workers keep this one)
        env["DST_DATA_DIR"] = str(settings.data_dir)
    if settings.ray_autoscaling:  # the driver decides whether the cluster can hold a trial
        env["DST_RAY_AUTOSCALING"] = "true"
    env["DST_RAY_NODES_WAIT_S"] = f"{settings.ray_nodes_wait_s:g}"
    return env


class RayExecutor:
    """Runs each experiment as a Ray Job whose driver (``service.driver``) runs Ray Tune.

    The driver's secrets (:data:`DRIVER_SECRETS`) never travel in the job, which Ray keeps and
    lists: either a file on the shared storage names them (only this user can read it; the
    driver removes it), or, with ``secrets_on_head``, the Ray head's own environment holds
    them and the job only names which the driver must find there.
    """

    def __init__(
        self,
        address: str,
        *,
        job_python: str = "python",
        env: dict[str, str] | None = None,
        timeout: float = 10.0,
        secrets_on_head: bool = False,
    ) -> None:
        self.address = address
        self.job_python = job_python
        self.env = dict(env or {})  # handed to the job's driver (see driver_env)
        self.timeout = timeout
        self.secrets_on_head = secrets_on_head
        self._client: JobSubmissionClient | None = None

    @classmethod
    def for_settings(cls, settings: Settings, address: str, job_python: str) -> RayExecutor:
        """The executor of the service configured by ``settings`` (Ray at ``address``)."""
        return cls(
            address,
            job_python=job_python,
            env=driver_env(settings),
            timeout=settings.call_timeout_s,
            secrets_on_head=settings.driver_secrets == "head",
        )

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            self._client = timed_job_client(self.address, timeout=self.timeout)
        return self._client

    def entrypoint(self, experiment_id: str) -> str:
        """The shell command the Ray Job runs."""
        return (
            f"{shlex.quote(self.job_python)} -m service.driver "
            f"--experiment-id {shlex.quote(experiment_id)}"
        )

    def submit(self, experiment_id: str) -> None:
        """Submit the experiment's driver job; a job that already exists is left alone.

        The driver reads the stored experiment and its trials from the database. Its secrets
        (:data:`DRIVER_SECRETS`) go in a file only its user can read, on the shared storage,
        which the job's environment names; or, with ``secrets_on_head``, the job names only
        the variables the driver must find in the head node's environment.
        """
        if self.status(experiment_id) is not None:
            log.info("job %s already exists; not submitting again", experiment_id)
            return
        env = {k: v for k, v in self.env.items() if k not in DRIVER_SECRETS}
        secrets = {k: v for k, v in self.env.items() if k in DRIVER_SECRETS}
        if self.secrets_on_head:  # the head must hold those the API has
            env[HEAD_SECRETS_ENV] = ",".join(sorted(k for k, v in secrets.items() if v))
        elif secrets:
            env[SECRETS_FILE_ENV] = str(write_secrets(self.secrets_file(experiment_id), secrets))
        try:
            self.client.submit_job(
                entrypoint=self.entrypoint(experiment_id),
                submission_id=experiment_id,
                runtime_env={"env_vars": env | JOB_ENV},
                metadata={"dst_experiment_id": experiment_id},
                entrypoint_num_cpus=0,
            )
        except Exception:
            exists = self._job_exists(experiment_id)
            if exists:  # an earlier submission Ray took after all (its answer was lost, or
                # the two raced): the same id, so the same experiment's job; not an error
                log.info("job %s exists after a failed submission; keeping it", experiment_id)
                return
            if exists is False:  # no job will read it
                self.release(experiment_id)
            raise
        log.info("submitted Ray job %s", experiment_id)

    def _job_exists(self, experiment_id: str) -> bool | None:
        """Whether Ray has a job of this id; None when Ray cannot answer."""
        try:
            return self.status(experiment_id) is not None
        except Exception:
            return None

    def secrets_file(self, experiment_id: str) -> Path:
        """Where the driver of ``experiment_id`` finds its secrets (under the storage path)."""
        storage = self.env.get("DST_STORAGE_PATH")
        if storage is None:
            raise ValueError("the driver's secrets need DST_STORAGE_PATH (the shared storage)")
        return Path(storage) / "secrets" / f"{experiment_id}.json"

    def release(self, experiment_id: str) -> None:
        """Remove the experiment's secrets file, if its driver has not already."""
        if "DST_STORAGE_PATH" in self.env:  # (also after a switch to secrets on the head)
            self.secrets_file(experiment_id).unlink(missing_ok=True)

    def status(self, experiment_id: str) -> JobStatus | None:
        """The job's status; None if Ray has no such job."""
        try:
            status = self.client.get_job_status(experiment_id)
        except RuntimeError as error:
            if no_such_job(error):
                return None
            raise
        return JobStatus(str(status.value))

    def stop(self, experiment_id: str) -> None:
        """Ask the job to stop: the driver gets SIGTERM and lets Tune save its state."""
        status = self.status(experiment_id)
        if status is not None and status.live:
            self.client.stop_job(experiment_id)

    def logs(self, experiment_id: str) -> str:
        """The driver's whole output so far; :class:`LookupError` if Ray has no such job."""
        try:
            return str(self.client.get_job_logs(experiment_id))
        except RuntimeError as error:
            if no_such_job(error):
                raise LookupError(f"Ray has no job {experiment_id}") from None
            raise

    def ping(self) -> bool:
        """True when the Ray Jobs API answers (with the client's credentials, within 2 s)."""
        try:
            self.client._do_request("GET", "/api/version", timeout=2).raise_for_status()
        except Exception:
            self._client = None
            return False
        return True


def no_such_job(error: RuntimeError) -> bool:
    """Whether the Jobs API's answer other than 200 (raised as text) says it has no such job
    (its 404; a bare "404" may be part of a job id)."""
    return "status code 404" in str(error)


def write_secrets(path: Path, secrets: dict[str, str]) -> Path:
    """``secrets`` as JSON at ``path``, readable by this user only (written whole, then
    renamed into place, so a reader never sees half of it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(secrets, out)
    os.replace(partial, path)
    return path


def take_secrets(environ: MutableMapping[str, str]) -> bool:
    """In the job driver: move the secrets from the file the job names into ``environ``
    (this process's own environment), then delete the file; or, with secrets from the head,
    check that ``environ`` (the head's environment) holds every one the job names. True when
    they come from the head."""
    needed = environ.pop(HEAD_SECRETS_ENV, None)
    if needed is not None:
        missing = [name for name in needed.split(",") if name and not environ.get(name)]
        if missing:
            raise RuntimeError(
                f"the Ray head's environment lacks {', '.join(missing)}: with "
                "DST_DRIVER_SECRETS=head the job driver takes the service's database URL and "
                "MLflow settings from the head node, so set them there as on the API"
            )
        return True
    name = environ.pop(SECRETS_FILE_ENV, None)
    if not name:
        return False
    path = Path(name)
    try:
        secrets = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(
            f"the driver's secrets file {path} is gone: a driver takes it once, when its job "
            "starts, and the service removes it when the experiment ends"
        ) from None
    environ.update(secrets)
    path.unlink(missing_ok=True)
    return False


def timed_job_client(address: str, timeout: float) -> JobSubmissionClient:
    """Ray's Jobs API client with a timeout on every HTTP call (Ray's has none), so a
    blackholed or hung head node costs one bounded wait, not a stuck thread. (Imported here:
    the job drivers share this module's constants and need no Jobs client.)"""
    from ray.job_submission import JobSubmissionClient

    class TimedJobClient(JobSubmissionClient):
        def __init__(self) -> None:
            self._timeout = timeout  # set first: the constructor already makes a request
            super().__init__(address)

        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._timeout)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedJobClient()
