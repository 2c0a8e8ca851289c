"""Service commands of the CLI: clear errors instead of tracebacks; tables of results."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from service.api.routes.experiments import log_part
from service.cli import app, follow_log, job_python, results_table, trial_line
from service.client import ApiError
from service.core.config import Settings

runner = CliRunner()


def test_unreachable_api_is_a_clear_error() -> None:
    for args in (["status"], ["cancel", "abc"], ["results", "abc"], ["logs", "abc"]):
        result = runner.invoke(app, [*args, "--api", "http://127.0.0.1:9", "--token", "t"])
        assert result.exit_code == 2, result.output
        assert "cannot reach the API at http://127.0.0.1:9" in result.output
        assert "Traceback" not in result.output


class FakeApi:
    """The API as the CLI's commands see it: keeps what is submitted; holds ``total``
    experiments, of which it lists the newest ``limit``."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.total = 0

    def submit(self, study: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        self.submitted.append(study)
        return {"id": "e1", "status": "pending", "n_trials": 1}

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        notice = "2 trials wait for a node that can hold them, since 2026-11-27 18:02:10 UTC"
        return {"id": experiment_id, "name": "s", "status": "running", "notice": notice,
                "trial_counts": {"pending": 2}, "mlflow": {}}  # fmt: skip

    def trials(self, experiment_id: str) -> list[dict[str, Any]]:
        return []

    def log(self, experiment_id: str, tail: int = 200) -> str:
        return "".join(f"{experiment_id} line {i}\n" for i in range(tail))

    def experiments(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        items = [
            {"id": f"e{i}", "status": "succeeded", "n_trials": 2, "name": f"study-{i}"}
            for i in range(min(limit, self.total))
        ]
        return {"items": items, "total": self.total, "offset": 0, "limit": limit}


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    api = FakeApi()
    monkeypatch.setattr("service.cli._client", lambda url, token: api)
    return api


SPEC = """\
name: overrides
tags: {purpose: test}
model: small-mlp
dataset: digits
training: {epochs: 15}
grid:
  criterion: [snip, set]
  sparsity.density: [0.1]
"""


def test_set_names_one_grid_field_or_tag_whole_in_a_spec_file(
    tmp_path: Path, fake_api: FakeApi
) -> None:
    """As with a preset, ``grid.sparsity.density`` is the grid's ``sparsity.density`` list (not
    a ``sparsity`` section inside the grid), ``tags.team.name`` is the tag ``team.name``, and
    a grid field replaces the entry the file spells another way (``criterion``)."""
    from service.study import StudySpec

    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC)
    sets = ["grid.sparsity.density=[0.2, 0.3]", "grid.sparsity.criterion=[magnitude]"]
    sets += ["tags.team.name=lab", "training.epochs=3", "grid.seed=[0, 1]"]
    args = ["submit", str(spec), *(a for s in sets for a in ("--set", s))]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (study,) = fake_api.submitted
    assert study["grid"] == {
        "criterion": ["magnitude"], "sparsity.density": [0.2, 0.3], "seed": [0, 1]
    }  # fmt: skip
    assert study["tags"] == {"purpose": "test", "team.name": "lab"}
    assert study["training"] == {"epochs": 3}
    assert StudySpec.model_validate(study).grid_size() == 1 * 2 * 2


def test_set_grid_field_spelled_another_way_replaces_a_preset_s_entry(fake_api: FakeApi) -> None:
    """The preset's grid has ``sparsity.criterion``; ``grid.criterion`` is the same field."""
    args = ["submit", "--preset", "fig1-small-mlp-higgs", "--set", "grid.criterion=[snip]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    grid = fake_api.submitted[0]["grid"]
    assert list(grid) == ["sparsity.criterion", "sparsity.growth", "sparsity.density", "seed"]
    assert grid["sparsity.criterion"] == ["snip"]


MAPPING = (
    "the top level must be a mapping of the study spec's fields (name, model, dataset, grid, ...)"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"{MAPPING}, got an empty file"),
        ("# only a comment\n", f"{MAPPING}, got an empty file"),
        ("- name: a\n- name: b\n", f"{MAPPING}, got a list"),
        ("just words\n", f"{MAPPING}, got a str"),
        ("name: [unclosed\n", "invalid YAML: expected ',' or ']', but got '<stream end>' "
         "(line 2, column 1)"),
        (None, "cannot read the spec file (No such file or directory)"),
        (b"name: \xff\n", "the spec file is not UTF-8 text"),
    ],
    ids=["empty", "comment-only", "list", "scalar", "bad-yaml", "missing", "not-utf8"],
)  # fmt: skip
def test_a_spec_file_that_is_no_study_is_a_one_line_error(
    tmp_path: Path, fake_api: FakeApi, text: str | bytes | None, message: str
) -> None:
    spec = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        spec.write_bytes(text)
    elif text is not None:
        spec.write_text(text)
    result = runner.invoke(app, ["submit", str(spec), "--set", "grid.seed=[0]"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"{spec}: {message}"]
    assert not fake_api.submitted


@pytest.fixture
def no_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A demo that must not start its services; the storage path it must not make."""

    def running_api(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started its services")

    monkeypatch.setattr("service.cli.running_api", running_api)
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path / "storage"))
    return tmp_path / "storage"


def test_demo_with_a_spec_file_that_is_no_study_fails_before_starting_anything(
    tmp_path: Path, no_services: Path
) -> None:
    spec = tmp_path / "empty.yaml"
    spec.write_text("")
    result = runner.invoke(app, ["demo", "--spec", str(spec)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"{spec}: {MAPPING}, got an empty file"]
    assert not no_services.exists()


def test_demo_with_an_invalid_study_fails_before_starting_anything(
    tmp_path: Path, no_services: Path
) -> None:
    spec = tmp_path / "dense.yaml"
    spec.write_text("name: s\nmodel: small-mlp\ndataset: digits\nsparsity: {density: 5}\n")
    result = runner.invoke(app, ["demo", "--spec", str(spec)])
    assert result.exit_code == 2
    assert "sparsity.density: Input should be less than or equal to 1" in result.output
    assert "Traceback" not in result.output


def test_yaml_dates_go_as_text_and_numbers_that_are_not_finite_are_refused(
    tmp_path: Path, fake_api: FakeApi
) -> None:
    """YAML reads an unquoted 2024-05-01 as a date, which JSON cannot carry: it goes as the
    text it was; an infinite or NaN value names its field (JSON has no form for it)."""
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.replace("name: overrides", "name: 2024-05-01"))
    assert runner.invoke(app, ["submit", str(spec), "--set", "tags.day=2024-05-02"]).exit_code == 0
    assert fake_api.submitted[0]["name"] == "2024-05-01"
    assert fake_api.submitted[0]["tags"]["day"] == "2024-05-02"
    for override, field in [("training.lr=.inf", "training.lr"), ("grid.seed=[.nan]", "seed[0]")]:
        result = runner.invoke(app, ["submit", str(spec), "--set", override])
        assert result.exit_code == 2, result.output
        assert "is not a finite number" in result.output and field in result.output
        assert "Traceback" not in result.output
    assert len(fake_api.submitted) == 1


def test_client_commands_need_no_valid_server_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A client reads only where the local token lies; a setting only the server reads
    cannot break it, and the server names the variable it cannot read."""
    from service.cli import _client

    monkeypatch.setenv("DST_PORT", "abc")
    monkeypatch.setenv("DST_DATA_ROOTS", "/data")
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path))
    monkeypatch.delenv("DST_API_TOKEN", raising=False)
    (tmp_path / "api-token").write_text("local-token\n")
    client = _client("http://127.0.0.1:9", None)
    assert client.http.headers["Authorization"] == "Bearer local-token"
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert result.output.startswith("invalid settings:") and "data_roots" in result.output
    monkeypatch.delenv("DST_DATA_ROOTS")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert result.output.startswith("invalid settings: DST_PORT: Input should be a valid integer")


def test_serve_on_a_port_another_server_answers_fails_and_keeps_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another API (anything answering /healthz) on the port: serve says the port is taken
    instead of claiming to run, and leaves the token file that server's clients use."""
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path))
    monkeypatch.setenv("DST_RAY_ADDRESS", "http://127.0.0.1:9")  # nothing local is started
    monkeypatch.setenv("DST_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.delenv("DST_API_TOKEN", raising=False)
    (tmp_path / "api-token").write_text("the-running-servers")
    try:
        result = runner.invoke(app, ["serve", "--port", str(port)])
    finally:
        other.shutdown()
    assert result.exit_code == 2, result.output
    assert f"the API cannot listen on 127.0.0.1:{port}: is the port in use?" in result.output
    assert "DST Lab API on" not in result.output
    assert (tmp_path / "api-token").read_text() == "the-running-servers"


def test_an_out_that_cannot_be_written_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before anything is fetched or trained."""
    taken = tmp_path / "file"
    taken.write_text("x")

    class NoFetching:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the report fetched {name} before checking --out")

    monkeypatch.setattr("service.cli._client", lambda url, token: NoFetching())
    result = runner.invoke(app, ["report", "e1", "--out", str(taken)])
    assert result.exit_code == 2 and f"cannot write the report into --out {taken}" in result.output
    spec = tmp_path / "run.yaml"
    spec.write_text("model: small-mlp\ndataset: digits\n")
    result = runner.invoke(app, ["run", str(spec), "--out", str(taken / "run")])
    assert result.exit_code == 2 and f"cannot write to --out {taken / 'run'}" in result.output
    assert "Traceback" not in result.output


def test_an_override_that_is_not_yaml_is_a_one_line_error(fake_api: FakeApi) -> None:
    args = ["submit", "--preset", "fig1-small-mlp-higgs", "--set", "training.epochs=[1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "--set 'training.epochs=[1': invalid YAML value: expected ',' or ']', but got "
        "'<stream end>' (line 1, column 3)"
    ]


MORE = "showing the {} newest of {} experiments"


@pytest.mark.parametrize(
    ("total", "limit", "rows", "note"),
    [
        (0, [], 0, "no experiments yet"),
        (20, [], 20, None),
        (25, [], 20, MORE.format(20, 25) + "; --limit 25 shows more"),
        (25, ["--limit", "3"], 3, MORE.format(3, 25) + "; --limit 25 shows more"),
        (25, ["--limit", "25"], 25, None),
        (900, ["--limit", "40"], 40, MORE.format(40, 900) + "; --limit 500 shows more"),
        (900, ["--limit", "500"], 500, MORE.format(500, 900)),  # the API lists no more
    ],
    ids=["none", "all", "cut", "cut-at-limit", "all-at-limit", "cut-above-max", "cut-at-max"],
)  # fmt: skip
def test_status_says_when_the_list_leaves_experiments_out(
    fake_api: FakeApi, total: int, limit: list[str], rows: int, note: str | None
) -> None:
    fake_api.total = total
    result = runner.invoke(app, ["status", *limit])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[rows:] == ([] if note is None else [note])
    if rows:
        assert lines[0] == "e0  succeeded     2 trials  study-0"
        assert lines[rows - 1].startswith(f"e{rows - 1}  ")


@pytest.mark.parametrize("limit", ["0", "501"])
def test_status_limit_out_of_range_is_a_one_line_error(fake_api: FakeApi, limit: str) -> None:
    result = runner.invoke(app, ["status", "--limit", limit])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"--limit must be between 1 and 500, got {limit}"]


def test_logs_prints_the_lines_the_api_gives_as_they_are(fake_api: FakeApi) -> None:
    result = runner.invoke(app, ["logs", "e7", "--tail", "2"])
    assert result.exit_code == 0, result.output
    assert result.output == "e7 line 0\ne7 line 1\n"  # no blank line added


class EndingApi(FakeApi):
    """An API whose submitted study has already ended, in ``status``."""

    def __init__(self, status: str, error: str | None = None) -> None:
        super().__init__()
        self.status, self.error = status, error

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return {"id": experiment_id, "name": "s", "status": self.status, "error": self.error,
                "n_trials": 2, "trial_counts": {self.status: 2}, "mlflow": {}}  # fmt: skip

    def results(self, experiment_id: str) -> dict[str, Any]:
        return {"group_by": ["sparsity.criterion"], "rows": []}


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        ("succeeded", None, 0),
        ("failed", "the driver exited: out of memory", 1),
        ("cancelled", None, 1),
    ],
)
def test_submit_wait_exits_1_unless_the_study_succeeded_and_says_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: str, error: str | None, code: int
) -> None:
    api = EndingApi(status, error)
    monkeypatch.setattr("service.cli._client", lambda url, token: api)
    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC)
    result = runner.invoke(app, ["submit", str(spec), "--wait"])
    assert result.exit_code == code, result.output
    assert f"status: {status}\n" in result.stdout and "criterion" in result.stdout
    hints = [f"error: {error}"] if error else []
    if code:
        hints.append("the job driver's log: dst logs e1")
    said = "".join(f"{line}\n" for line in hints)  # after the progress bar
    assert result.stderr.endswith(said) and ("dst logs" in result.stderr) == bool(code)


class GrowingLog:
    """An experiment whose driver is writing, as a follower sees it: each status read moves on
    one step of ``script``, a (status, the log so far) pair; the log is None while Ray has no
    job for it (404), or an int: the API answers with that status."""

    def __init__(self, script: list[tuple[str | int, str | int | None]]) -> None:
        self.script, self.step = script, -1
        self.reads: list[tuple[int | None, int | None]] = []

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        """The next step's status; an int: the API answers the state read with that status."""
        self.step = min(self.step + 1, len(self.script) - 1)
        status = self.script[self.step][0]
        if isinstance(status, int):
            raise ApiError(status, "the database is unreachable; retry in a moment")
        return {"id": experiment_id, "status": status}

    def log_chunk(
        self, experiment_id: str, tail: int | None = None, since: int | None = None
    ) -> tuple[str, int]:
        self.reads.append((tail, since))
        log = self.script[self.step][1]
        if not isinstance(log, str):
            raise ApiError(log or 404, f"experiment {experiment_id} has no log on Ray")
        return log_part(log, tail, since), len(log)


def followed(
    script: list[tuple[str | int, str | int | None]], tail: int = 2
) -> tuple[str, GrowingLog]:
    api, out = GrowingLog(script), []
    follow_log(api, "e7", tail, out.append, poll=0)  # type: ignore[arg-type]
    return "".join(out), api


def test_following_echoes_the_tail_then_each_addition_once() -> None:
    """Nothing is asked of Ray while the experiment is queued; a just-submitted job that Ray
    does not list yet is waited for; a line written in two parts comes out whole; the log read
    after the end is the last."""
    out, api = followed(
        [
            ("queued", None),
            ("submitted", None),
            ("running", "l0\nl1\nl2\n"),
            ("running", "l0\nl1\nl2\n"),
            ("running", "l0\nl1\nl2\n50%"),
            ("running", "l0\nl1\nl2\n50%\r100%\ndone\n"),
            ("succeeded", "l0\nl1\nl2\n50%\r100%\ndone\nbye\n"),
        ]
    )
    assert out == "l1\nl2\n50%\r100%\ndone\nbye\n"
    assert api.reads == [(2, None), (2, None), (None, 9), (None, 9), (None, 12), (None, 23)]


def test_a_follower_reads_a_new_log_whole() -> None:
    out, _ = followed([("running", "old\nlines\n"), ("running", "new\n"), ("failed", "new\n")])
    assert out == "old\nlines\nnew\n"


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ([("running", 500)], 500),  # not a passing state of a log: said at once
        ([("cancelled", None)], 404),  # ended without ever being submitted: no log will come
        ([("running", 503), ("failed", 503)], 503),  # Ray away at the end: the log is not whole
    ],
)
def test_following_stops_on_an_answer_that_will_not_change(
    script: list[tuple[str, str | int | None]], status: int
) -> None:
    with pytest.raises(ApiError) as raised:
        followed(script)
    assert raised.value.status == status


def test_logs_follow_prints_the_log_and_then_the_experiments_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = GrowingLog([("running", "a\n"), ("running", "a\nb\n"), ("succeeded", "a\nb\nc\n")])
    monkeypatch.setattr("service.cli._client", lambda url, token: api)
    monkeypatch.setattr("service.cli.time.sleep", lambda seconds: None)
    result = runner.invoke(app, ["logs", "e7", "--follow"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "a\nb\nc\n" and result.stderr == "status: succeeded\n"


@pytest.mark.parametrize("tail", ["0", "-3"])
def test_logs_tail_below_one_is_a_one_line_error(fake_api: FakeApi, tail: str) -> None:
    result = runner.invoke(app, ["logs", "e7", "--tail", tail])
    assert result.exit_code == 2 and "--tail" in result.output, result.output


def test_status_shows_what_an_experiment_waits_for(fake_api: FakeApi) -> None:
    result = runner.invoke(app, ["status", "e7"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == (
        "notice: 2 trials wait for a node that can hold them, since 2026-11-27 18:02:10 UTC"
    )


def test_results_table_has_one_line_per_row() -> None:
    row = {
        "config": {"sparsity.mode": "dst", "sparsity.criterion": "snip"}, "n": 3,
        "test_acc_mean": 0.91234, "test_acc_std": 0.01, "test_loss_mean": 0.3,
        "test_loss_std": 0.02, "test_acc_at_best_val_mean": 0.92, "test_acc_at_best_val_std": 0.0,
    }  # fmt: skip
    dense = row | {"config": {"sparsity.mode": "dense", "sparsity.criterion": None}}
    results = {"group_by": ["sparsity.mode", "sparsity.criterion"], "rows": [row, dense]}
    lines = results_table(results).splitlines()
    assert lines[0].split()[:3] == ["mode", "criterion", "n"]
    assert len(lines) == 4 and "0.9123 ± 0.0100" in lines[2] and "0.9200 ± 0.0000" in lines[2]
    assert lines[3].split()[:2] == ["dense", "-"]


def test_a_trial_line_says_where_it_runs_and_whether_it_resumed() -> None:
    trial = {
        "index": 3, "state": "running", "epoch": 7, "epochs": 30, "label": "seed=1",
        "metrics": {"test_acc": 0.8765}, "node": None, "resumed_from_epoch": None,
    }  # fmt: skip
    words = ["3", "running", "epoch", "7/30", "seed=1", "test_acc=0.8765"]
    assert trial_line(trial).split() == words
    moved = trial | {"metrics": None, "node": "worker-2", "resumed_from_epoch": 4}
    assert trial_line(moved).endswith("seed=1  on worker-2  (resumed after epoch 4)")
    shared = moved | {"gpus": "0", "resumed_from_epoch": None}
    assert trial_line(shared).endswith("seed=1  on worker-2 (GPU 0)")


def test_the_cli_answers_without_importing_torch() -> None:
    """``dst --help`` and the service commands load neither PyTorch nor the registries."""
    import subprocess
    import sys

    heavy = "{'torch', 'ray', 'mlflow', 'httpx'}"
    code = f"import sys, service.cli; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "presses"),
    [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 1)],
    ids=["one-ctrl-c", "two-ctrl-c", "sigterm-to-the-group"],
)
def test_ctrl_c_stops_serve_and_everything_it_started(
    tmp_path: Path, signum: int, presses: int
) -> None:
    """As a terminal (SIGINT) or a process manager (SIGTERM) does it: the signal to the whole
    process group of `uv run dst serve`, which uv forwards to the server once more. The API,
    Ray and MLflow are all gone in seconds, whichever copy of the signal lands first."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    from service.local import free_port
    from tests.service.e2e import wait_for

    port = free_port()
    env = os.environ | {"DST_STORAGE_PATH": str(tmp_path), "DST_PORT": str(port)}
    proc = subprocess.Popen(
        ["uv", "run", "--frozen", "dst", "serve"],
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # with Ctrl-C's default action, as in a terminal, even when this suite runs as a
        # shell's background job (`cmd &` makes a child ignore SIGINT, and Python respects it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: set[int] = set()
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "dst serve with its Ray and MLflow", 240)
        started = alive(descendants(proc.pid))
        assert len(started) >= 4  # uv's child, Ray's head processes, MLflow
        for _ in range(presses):
            os.killpg(proc.pid, signum)
            time.sleep(0.3)
        proc.wait(timeout=30)
        wait_for(lambda: not alive(started), "every started process to end", 15)
    finally:  # on failure: what it started, listed before killing re-parents it to init
        leftover = started | descendants(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in alive(leftover):
            os.kill(pid, signal.SIGKILL)


def test_a_jobs_driver_runs_with_this_python_only_on_the_ray_serve_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster's head this interpreter's path may not exist: the driver runs with
    ``DST_JOB_PYTHON`` there, and wherever that is set."""
    for name in ("DST_RAY_ADDRESS", "DST_JOB_PYTHON"):
        monkeypatch.delenv(name, raising=False)
    cluster = "http://ray-head:8265"
    assert job_python(Settings()) == sys.executable  # serve starts a local Ray
    assert job_python(Settings(ray_address=cluster)) == "python"
    monkeypatch.setenv("DST_JOB_PYTHON", "/app/.venv/bin/python")
    assert job_python(Settings()) == "/app/.venv/bin/python"
    assert job_python(Settings(ray_address=cluster)) == "/app/.venv/bin/python"


def test_a_stored_spec_saved_by_the_cli_reruns_the_same_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dst spec ID`` prints the study as the API stored it (a grid field named without its
    section comes back under its full path, defaults filled in); submitted again, it makes the
    same trials, and the API refuses nothing of it."""
    from fastapi.testclient import TestClient

    from tests.service.test_analysis import api_client
    from tests.service.test_api import unreachable_app

    with TestClient(unreachable_app(tmp_path)) as http:
        api = api_client(http)
        monkeypatch.setattr("service.cli._client", lambda url, token: api)
        spec = tmp_path / "study.yaml"
        spec.write_text(SPEC + "ranking: {metric: test_acc_at_best_val}\n")
        first = runner.invoke(app, ["submit", str(spec)])
        assert first.exit_code == 0, first.output
        (old,) = api.experiments()["items"]
        shown = runner.invoke(app, ["spec", old["id"]])
        assert shown.exit_code == 0, shown.output
        stored = yaml.safe_load(shown.output)
        assert stored["grid"] == {"sparsity.criterion": ["snip", "set"], "sparsity.density": [0.1]}
        assert stored["training"]["epochs"] == 15 and stored["training"]["batch_size"] is None
        assert stored["ranking"] == {"metric": "test_acc_at_best_val"}
        saved = tmp_path / "saved.yaml"
        saved.write_text(shown.output)
        again = runner.invoke(app, ["submit", str(saved)])
        assert again.exit_code == 0, again.output
        new = next(e for e in api.experiments()["items"] if e["id"] != old["id"])
        assert api.spec(new["id"]) == api.spec(old["id"])
        assert [(t["label"], t["params"]) for t in api.trials(new["id"])] == [
            (t["label"], t["params"]) for t in api.trials(old["id"])
        ]
        missing = runner.invoke(app, ["spec", "nope"])
        assert missing.exit_code == 2 and "nope" in missing.output


class FailedApi(FakeApi):
    """An experiment that failed, with trials that failed (a trace, a long one-line error),
    one that resumed after an error, and one that never erred."""

    TRACE = (
        "Traceback (most recent call last):\n"
        '  File "dst/training.py", line 210, in fit\n'
        "    self.step()\n"
        "ValueError: the mask has 3 layers, the model 4\n\n"
    )
    LONG = "RuntimeError: " + "x" * 200

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        counts = {"failed": 2, "succeeded": 1, "running": 1}
        return {"id": experiment_id, "name": "s", "status": "failed", "notice": None,
                "error": "2 of 4 trials failed", "trial_counts": counts, "mlflow": {}}  # fmt: skip

    def trials(self, experiment_id: str) -> list[dict[str, Any]]:
        base = {"epoch": 3, "epochs": 15, "metrics": None, "node": None,
                "resumed_from_epoch": None, "error": None}  # fmt: skip
        return [
            base | {"index": 0, "state": "failed", "label": "snip", "error": self.TRACE},
            base | {"index": 1, "state": "failed", "label": "set", "error": self.LONG},
            base | {"index": 2, "state": "succeeded", "label": "mest"},
            base | {"index": 3, "state": "running", "label": "rigl", "error": "OSError: lost",
                    "resumed_from_epoch": 2},
        ]  # fmt: skip


def test_status_shows_why_an_experiment_and_its_trials_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The experiment's error under its line; under each trial's line the last line of its
    error (a trace ends with the exception), cut to 160 characters."""
    api = FailedApi()
    monkeypatch.setattr("service.cli._client", lambda url, token: api)
    result = runner.invoke(app, ["status", "e7"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "e7  s  failed  {'failed': 2, 'succeeded': 1, 'running': 1}",
        "error: 2 of 4 trials failed",
        "     0 failed     epoch 3/15  snip",
        "        error: ValueError: the mask has 3 layers, the model 4",
        "     1 failed     epoch 3/15  set",
        "        error: RuntimeError: " + "x" * 145 + "…",
        "     2 succeeded  epoch 3/15  mest",
        "     3 running    epoch 3/15  rigl  (resumed after epoch 2)",
        "        last error: OSError: lost",
    ]


def said(output: str) -> str:
    """A usage error's words on one line, without the box drawn around them."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


COMMANDS_OF_ONE_EXPERIMENT = ["status", "cancel", "logs", "results", "spec", "report"]


@pytest.mark.parametrize("command", COMMANDS_OF_ONE_EXPERIMENT)
@pytest.mark.parametrize("experiment_id", ["", "  "])
def test_an_empty_experiment_id_is_a_usage_error(command: str, experiment_id: str) -> None:
    """``/experiments/`` is the list (the API redirects there): nothing is asked of it."""
    args = [command, experiment_id, "--api", "http://127.0.0.1:9", "--token", "t"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for 'experiment_id': an experiment id cannot be empty or blank" in said(
        result.output
    )
    assert "cannot reach the API" not in result.output


@pytest.mark.parametrize("command", COMMANDS_OF_ONE_EXPERIMENT)
@pytest.mark.parametrize("experiment_id", ["../presets", "0123/trials"])
def test_an_experiment_id_with_a_slash_is_a_usage_error(command: str, experiment_id: str) -> None:
    """The server decodes ``%2F`` before routing: ``<id>/trials`` would answer as the trials."""
    args = [command, experiment_id, "--api", "http://127.0.0.1:9", "--token", "t"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"an experiment id cannot contain '/': {experiment_id!r}" in said(result.output)


def test_an_id_that_is_a_path_reaches_no_other_route(tmp_path: Path) -> None:
    """Each id is one quoted path segment: ``../presets`` is not the presets, ``..`` not the
    root, ``.`` not the list of experiments; each is an experiment the API does not hold."""
    from fastapi.testclient import TestClient

    from tests.service.test_analysis import api_client
    from tests.service.test_api import unreachable_app

    with TestClient(unreachable_app(tmp_path)) as http:
        api = api_client(http)
        for experiment_id, detail in [
            ("..", "no experiment '..'"),
            (".", "no experiment '.'"),
            ("a?b#c", "no experiment 'a?b#c'"),
        ]:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("service.cli._client", lambda url, token: api)
                result = runner.invoke(app, ["status", experiment_id])
            assert result.exit_code == 2, (experiment_id, result.output)
            assert result.output.splitlines() == [f"HTTP 404: {detail}"]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["status", "e1", "--token", "tökén"], "--token"),
        (["status", "e1", "--token", "two\nlines"], "--token"),
        (["submit", "SPEC", "--idempotency-key", "ключ"], "--idempotency-key"),
    ],
    ids=["token-not-ascii", "token-newline", "key-not-ascii"],
)
def test_a_header_option_http_cannot_carry_is_a_usage_error(
    tmp_path: Path, args: list[str], option: str
) -> None:
    """A header is ASCII bytes: the option is named before anything is sent."""
    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC)
    args = [str(spec) if a == "SPEC" else a for a in args]
    result = runner.invoke(app, [*args, "--api", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    words = said(result.output)
    assert f"Invalid value for '{option}'" in words
    assert "must be printable ASCII text: it is sent as an HTTP header" in words
    assert "cannot reach the API" not in words and result.exception is not None
    assert isinstance(result.exception, SystemExit)  # a usage error, not a traceback


def test_a_stored_token_http_cannot_carry_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path))
    monkeypatch.delenv("DST_API_TOKEN", raising=False)
    (tmp_path / "api-token").write_text("tökén\n")
    result = runner.invoke(app, ["status", "e1", "--api", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "the API token must be printable ASCII text: it is sent as an HTTP header"
    ]


def test_yaml_keys_go_as_json_text_and_keys_json_cannot_carry_are_refused(
    tmp_path: Path, fake_api: FakeApi
) -> None:
    """YAML reads an unquoted ``2024-01-01`` key as a date, ``7`` as a number and ``true`` as
    a boolean; JSON's keys are text: each goes as JSON writes it. Binary data as a key has no
    text, and two keys that become the same text would lose one: both are refused by field."""
    import json

    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.replace("{purpose: test}", "{2024-01-01: new year, 7: seven, true: y}"))
    result = runner.invoke(app, ["submit", str(spec)])
    assert result.exit_code == 0, result.output
    tags = fake_api.submitted[0]["tags"]
    assert tags == {"2024-01-01": "new year", "7": "seven", "true": "y"}
    assert json.loads(json.dumps(fake_api.submitted[0])) == fake_api.submitted[0]
    for tags_yaml, message in [
        ("{!!binary aGk=: x}", "tags: a bytes is not a key of a spec mapping"),
        ("{2024-01-01: a, '2024-01-01': b}", "tags: two keys are both '2024-01-01' as text"),
        ("{.nan: x}", "tags: the key nan is not a finite number"),
    ]:
        spec.write_text(SPEC.replace("{purpose: test}", tags_yaml))
        result = runner.invoke(app, ["submit", str(spec)])
        assert result.exit_code == 2, result.output
        assert result.output.splitlines() == [message]
    assert len(fake_api.submitted) == 1


@pytest.mark.parametrize("port", ["70000", "65536", "0", "-1"])
def test_serve_refuses_a_port_outside_1_to_65535(no_services: Path, port: str) -> None:
    """Said as the arguments are read, before anything starts; 0 is not taken for unset."""
    result = runner.invoke(app, ["serve", "--port", port])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--port'" in said(result.output)
    assert not no_services.exists()


@pytest.mark.parametrize(("port", "used"), [(["--port", "1"], 1), (["--port", "65535"], 65535),
                                           ([], 8123)])  # fmt: skip
def test_serve_listens_on_the_port_given_else_the_settings_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, port: list[str], used: int
) -> None:
    from service.cli import StartError

    asked: list[int] = []

    def running_api(settings: Settings, wait_for_app: bool = True) -> None:
        asked.append(settings.port)
        raise StartError("not started in this test")

    monkeypatch.setattr("service.cli.running_api", running_api)
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path))
    monkeypatch.setenv("DST_PORT", "8123")
    result = runner.invoke(app, ["serve", *port])
    assert result.exit_code == 2 and asked == [used], result.output


def test_serve_refuses_dst_port_0(no_services: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS would pick a port no client is told of."""
    monkeypatch.setenv("DST_PORT", "0")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "invalid settings: DST_PORT: Input should be greater than or equal to 1"
    ]


class Clock:
    """``service.cli``'s time: sleeping moves it on at once, so a deadline passes in no time."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


UNAVAILABLE = "the database is unreachable; retry in a moment"


class UnavailableApi(EndingApi):
    """An API that answers 503 to the first ``outage`` reads of the experiment's state (all of
    them if None), then says the study succeeded."""

    def __init__(self, outage: int | None) -> None:
        super().__init__("succeeded")
        self.outage, self.reads = outage, 0

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        self.reads += 1
        if self.outage is None or self.reads <= self.outage:
            raise ApiError(503, UNAVAILABLE)
        return super().experiment(experiment_id)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("service.cli.time", clock)
    return clock


def test_submit_wait_rides_out_503_answers_and_notes_it_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = UnavailableApi(outage=3)
    monkeypatch.setattr("service.cli._client", lambda url, token: api)
    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC)
    with caplog.at_level("WARNING", logger="dst.service"):
        result = runner.invoke(app, ["submit", str(spec), "--wait"])
    assert result.exit_code == 0, result.output
    assert "status: succeeded\n" in result.stdout
    assert api.reads == 4 and clock.now == 3.0  # three 503s, a second apart, then the answer
    assert [r.getMessage() for r in caplog.records] == [
        f"HTTP 503: {UNAVAILABLE}; asking again for up to 300 s"
    ]


def test_submit_wait_gives_up_when_the_503s_outlast_its_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """Asked every second from 0 s: the read at 300 s is the last one the 300 s allow."""
    api = UnavailableApi(outage=None)
    monkeypatch.setattr("service.cli._client", lambda url, token: api)
    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC)
    result = runner.invoke(app, ["submit", str(spec), "--wait"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == f"HTTP 503: {UNAVAILABLE}"
    assert api.reads == 301 and clock.now == 300.0


@pytest.mark.parametrize("status", [503, 500])
def test_following_rides_out_503s_of_the_experiments_state_only(status: int) -> None:
    """The state answers 503 twice: the follower asks again and reads the log on; any other
    error is said at once."""
    script: list[tuple[str | int, str | int | None]] = [
        ("running", "a\n"),
        (status, None),
        (status, None),
        ("succeeded", "a\nb\n"),
    ]
    if status != 503:
        with pytest.raises(ApiError) as raised:
            followed(script)
        assert raised.value.status == status
        return
    out, api = followed(script)
    assert out == "a\nb\n" and api.reads == [(2, None), (None, 2)]
