"""Service commands of the ``dst`` CLI: serve, submit, status, cancel, logs, results, demo.

``dst`` is one command: the engine's commands (run, inspect, models, ...) come from
:mod:`dst.cli`; this module adds the ones that talk to (or start) the REST API.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from dst.cli import app, fail
from service.client import (
    DEFAULT_URL,
    NOT_HEADER_TEXT,
    TERMINAL,
    ApiClient,
    ApiError,
    default_token,
    header_text,
    parent_closed,
    write_token,
)
from service.states import ExperimentStatus, TrialState

if TYPE_CHECKING:
    from service.core.config import Settings

log = logging.getLogger("dst.service")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T = TypeVar("T")


def header_option(value: str | None) -> str | None:
    """An option sent as an HTTP header (``--token``, ``--idempotency-key``), checked as it is
    parsed: text a header cannot carry is a usage error naming the option, not a traceback
    from deep in the HTTP client."""
    if value is not None and not header_text(value):
        raise typer.BadParameter(NOT_HEADER_TEXT)
    return value


def experiment_id_argument(value: str | None) -> str | None:
    """An experiment id, checked as it is parsed: an empty (or blank) one would address the
    list of experiments instead, one with ``/`` another route, so either is a usage error."""
    if value is not None and not value.strip():
        raise typer.BadParameter("an experiment id cannot be empty or blank")
    if value is not None and "/" in value:
        raise typer.BadParameter(f"an experiment id cannot contain '/': {value!r}")
    return value


ApiUrl = Annotated[str, typer.Option("--api", envvar="DST_API_URL", help="REST API address")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="DST_API_TOKEN", help="API token", callback=header_option),
]
ExperimentId = Annotated[str, typer.Argument(callback=experiment_id_argument)]


def _client(api: str, token: str | None) -> ApiClient:
    """The REST client of ``api``, with ``token`` or else the local one; a stored token that
    no HTTP header can carry exits with a line saying so."""
    from service.core.config import storage_path_from_env

    try:
        return ApiClient(api, token or default_token(storage_path_from_env()))
    except ValueError as error:
        raise fail(str(error)) from None


DUPLICATE_SIGNAL_S = 1.0  # a second signal this soon is the first one delivered again


class _Stopper:
    """The SIGINT/SIGTERM handler of a command that started local services.

    The first signal unwinds the command (its ``finally`` stops everything it started); a
    signal within :data:`DUPLICATE_SIGNAL_S` of it is the same stop delivered twice (a
    terminal or a process manager signals the whole process group, and ``uv run`` forwards
    the signal to its child once more) and is ignored; any later one, or one that arrives
    while stopping, kills what is left at once.
    """

    def __init__(self, local: Any) -> None:
        self.local = local
        self.first: float | None = None  # when the first signal came
        self.stopping = False  # the command's cleanup has begun

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first < DUPLICATE_SIGNAL_S:
            return
        if self.first is None and not self.stopping:
            self.first = now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.local.kill()
        os._exit(128 + signum)


class StartError(RuntimeError):
    """The local services a command needs did not start (the message says why)."""


@contextmanager
def running_api(settings: Settings, wait_for_app: bool = True) -> Iterator[str]:
    """Start the API at once and, beside it in the background, whatever the settings leave
    unconfigured (a local Ray and a local MLflow server, started concurrently); yield the
    API's address as soon as it answers ``/healthz`` (and, with ``wait_for_app``, serves its
    routes; ``/readyz`` says when Ray and MLflow are up). On exit everything stops within
    seconds; a second Ctrl-C (or SIGTERM) while stopping kills what is left at once."""
    import uvicorn

    from service.deferred import DeferredApp
    from service.local import LocalServices, free_port, uncached_bytecode

    if why := uncached_bytecode():
        log.warning("starting slowly: %s", why)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    local = LocalServices()
    # SIGTERM (a process manager, `kill`) unwinds like Ctrl-C, so local services are stopped;
    # a SIGINT this process was started ignoring (`cmd &` in a script) stays ignored
    stopper = _Stopper(local)
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, stopper)
    starters: list[tuple[str, Any]] = []
    ray_address, mlflow_uri = settings.ray_address, settings.mlflow_tracking_uri
    driver_python = job_python(settings)  # (before the local Ray's address is filled in)
    if not ray_address:
        dashboard = free_port()
        ray_address = f"http://127.0.0.1:{dashboard}"
        starters.append(("Ray", lambda: local.start_ray(dashboard=dashboard)))
    if not mlflow_uri:
        port, storage = free_port(), settings.storage_path / "mlflow"
        mlflow_uri = f"http://127.0.0.1:{port}"
        starters.append(("MLflow", lambda: local.start_mlflow(storage, port=port)))
    settings = settings.model_copy(
        update={"ray_address": ray_address, "mlflow_tracking_uri": mlflow_uri}
    )

    def build() -> Any:  # on a thread, while /healthz already answers
        from service.execution import RayExecutor
        from service.main import create_app
        from service.tracking import MlflowTracker

        executor = RayExecutor.for_settings(settings, ray_address, driver_python)
        tracker = MlflowTracker(mlflow_uri, settings.mlflow_ui_url)
        return create_app(settings, executor=executor, tracker=tracker)

    deferred = DeferredApp(build)
    config = uvicorn.Config(
        deferred,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)

    def serve() -> None:  # a failure to start is said below, once, not as a traceback
        with suppress(OSError, SystemExit):
            server.run()

    thread = threading.Thread(target=serve, name="dst-api", daemon=True)
    try:
        thread.start()
        for name, start in starters:
            threading.Thread(target=_start, args=(name, start), daemon=True).start()
        url = f"http://{settings.host}:{settings.port}"
        client = ApiClient(url, None)
        deadline = time.monotonic() + 60
        loaded = (lambda: deferred.app is not None) if wait_for_app else (lambda: True)
        # started: this server listens (another one on the port would answer /healthz too)
        while not (server.started and client.healthy() and loaded()):
            if not server.started and not thread.is_alive():  # uvicorn has logged why
                raise StartError(
                    f"the API cannot listen on {settings.host}:{settings.port}: is the port "
                    f"in use? Choose another with --port (or DST_PORT)"
                )
            if time.monotonic() > deadline or not thread.is_alive() or deferred.error:
                raise StartError(f"the API did not start on {url}: {deferred.error}")
            time.sleep(0.05)
        yield url
    finally:
        stopper.stopping = True  # from here a new signal kills what is left
        server.should_exit = True  # then the app waits for its background work (bounded)
        thread.join(timeout=settings.shutdown_wait_s + 5)
        local.stop(grace=2)  # nothing left in local Ray or MLflow is worth a longer wait
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def job_python(settings: Settings) -> str:
    """The Python a job's driver runs with: this one on the local Ray that ``serve`` starts,
    else (a cluster's head, where this interpreter's path may not exist) ``DST_JOB_PYTHON``,
    which also wins wherever it is set."""
    if settings.ray_address or "job_python" in settings.model_fields_set:
        return settings.job_python
    return sys.executable


def _start(name: str, start: Any) -> None:
    """Start a local service in the background; a failure is logged (``/readyz`` shows it)."""
    try:
        start()
    except Exception as error:
        log.error("local %s did not start: %s", name, error)


def wait_ready(url: str, timeout: float = 300) -> None:
    """Wait until the API says the database, Ray and MLflow are all reachable."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise StartError(f"Ray and MLflow were not ready within {timeout:.0f} s")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: settings)")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="port, 1-65535 (default: settings)")
    ] = None,
) -> None:
    """Run the REST API; start a local Ray and MLflow server if none is configured."""
    settings = _settings()
    updates: dict[str, Any] = {"host": host} if host else {}  # an empty --host: the settings'
    if port is not None:
        updates["port"] = port
    settings = settings.model_copy(update=updates)
    settings.storage_path.mkdir(parents=True, exist_ok=True)
    try:
        with running_api(settings, wait_for_app=False) as url:
            _serving(settings, url)
    except StartError as error:
        raise fail(str(error)) from None


def _serving(settings: Settings, url: str) -> None:
    """Say where the API listens and how to reach it, then wait for Ctrl-C."""
    if os.environ.get("DST_API_TOKEN"):  # configured: it stays where the operator keeps it
        where = "$DST_API_TOKEN"
    else:  # generated, once this API listens: kept in the storage path for the local CLI
        where = str(write_token(settings.storage_path, settings.api_token.get_secret_value()))
    typer.echo(f"DST Lab API on {url} (docs: {url}/docs); token in {where}")
    typer.echo(f"Ctrl-C to stop; {url}/readyz says when Ray and MLflow are up")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopping")


def _settings(**values: Any) -> Settings:
    """The service settings (``DST_*`` and ``values``); a bad one exits with a line naming
    the variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.core.config import Settings

    try:
        return Settings(**values)
    except ValidationError as error:
        problems = [
            f"DST_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors()
        ]
        raise fail("invalid settings: " + "; ".join(problems)) from None
    except SettingsError as error:
        raise fail(f"invalid settings: {error}") from None


# how long a waiting command asks again while the API answers 503 (its database or Ray away
# for now, the answer says to retry later) before it gives up with that answer
UNAVAILABLE_PATIENCE_S = 300.0


def through_unavailable(
    read: Callable[[], T], pause: float, patience: float = UNAVAILABLE_PATIENCE_S
) -> T:
    """``read()``, asked again every ``pause`` seconds while the API answers 503 (a passing
    outage of what it depends on), for at most ``patience`` seconds; then the last 503 is
    raised. Any other error is raised at once. The first 503 is noted in the log, once."""
    deadline = time.monotonic() + patience
    noted = False
    while True:
        try:
            return read()
        except ApiError as error:
            if error.status != 503 or time.monotonic() + pause > deadline:
                raise
            if not noted:
                log.warning("%s; asking again for up to %.0f s", error, patience)
                noted = True
        time.sleep(pause)


def wait_for(client: ApiClient, experiment_id: str, poll: float = 1.0) -> dict[str, Any]:
    """Show a finished/total progress bar until the experiment ends; return its last state.
    A 503 answer (the API's database away for now) is asked again, for a while."""
    experiment = through_unavailable(lambda: client.experiment(experiment_id), poll)
    from tqdm import tqdm

    with tqdm(total=experiment["n_trials"], desc=experiment["name"], unit="trial") as bar:
        while True:
            counts = experiment["trial_counts"]
            done = sum(counts.get(s, 0) for s in TERMINAL)
            bar.n = done
            note = {"error": experiment["error"][:80]} if experiment.get("error") else {}
            running = counts.get(TrialState.RUNNING, 0)
            bar.set_postfix(running=running, status=experiment["status"], **note)
            bar.refresh()
            if experiment["status"] in TERMINAL:
                return experiment
            time.sleep(poll)
            experiment = through_unavailable(lambda: client.experiment(experiment_id), poll)


def wait_parent_closed(client: ApiClient, experiment_id: str, timeout: float = 120) -> bool:
    """Wait (bounded) until the ended experiment's MLflow parent run is closed with its
    results, analysis and figures; False if it is not closed in time (MLflow is down). A 503
    answer (the API's database away for now) is asked again within the same bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if parent_closed(client.experiment(experiment_id)):
                return True
        except ApiError as error:
            if error.status != 503:
                raise
        time.sleep(0.25)
    return False


def results_table(results: dict[str, Any]) -> str:
    """The results (as the API returns them) as an aligned text table."""
    from service.results import format_table

    return format_table(results["group_by"], results["rows"])


@app.command()
def submit(
    spec_path: Annotated[
        Path | None, typer.Argument(metavar="[SPEC]", help="study spec (YAML or JSON)")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="submit a preset (dst presets) instead of a SPEC file")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override, e.g. training.epochs=5 or grid.seed=[0,1]"),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(help="wait and show progress, then the results; exit 1 unless it succeeded"),
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="retry-safe submission key", callback=header_option)
    ] = None,
    api: ApiUrl = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Submit a study (a SPEC file or a --preset, with --set overrides) to the REST API."""
    study = _study(spec_path, preset, set_ or [])
    client = _client(api, token)
    try:
        created = client.submit(study, idempotency_key)
        typer.echo(
            f"experiment {created['id']}: {created['status']} ({created['n_trials']} trials)"
        )
        if not wait:
            return
        final = wait_for(client, created["id"])
        typer.echo(f"status: {final['status']}")
        ended = through_unavailable(lambda: client.results(created["id"]), pause=1.0)
        typer.echo(results_table(ended))
    except (ApiError, OSError) as error:
        raise fail(str(error)) from None
    if final["status"] != ExperimentStatus.SUCCEEDED:  # said, and in the exit code, for scripts
        if final.get("error"):
            typer.echo(f"error: {final['error']}", err=True)
        typer.echo(f"the job driver's log: dst logs {created['id']}", err=True)
        raise typer.Exit(code=1)


MAX_LISTED = 500  # the API's largest page of experiments


@app.command()
def status(
    experiment_id: Annotated[
        str | None,
        typer.Argument(help="omit to list experiments", callback=experiment_id_argument),
    ] = None,
    limit: Annotated[
        int, typer.Option(help=f"list this many of the newest experiments (at most {MAX_LISTED})")
    ] = 20,
    api: ApiUrl = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Show one experiment with its trials, or list the newest experiments."""
    if not 1 <= limit <= MAX_LISTED:
        raise fail(f"--limit must be between 1 and {MAX_LISTED}, got {limit}")
    client = _client(api, token)
    try:
        if experiment_id is None:
            for line in experiment_lines(client.experiments(limit=limit), limit):
                typer.echo(line)
            return
        e = client.experiment(experiment_id)
        typer.echo(f"{e['id']}  {e['name']}  {e['status']}  {e['trial_counts']}")
        if e.get("error"):
            typer.echo(f"error: {e['error']}")
        if e.get("notice"):
            typer.echo(f"notice: {e['notice']}")
        if e.get("mlflow", {}).get("parent_run_url"):
            typer.echo(f"MLflow: {e['mlflow']['parent_run_url']}")
        for t in client.trials(experiment_id):
            typer.echo(trial_line(t))
            if t.get("error"):
                typer.echo(trial_error_line(t))
    except ApiError as error:
        raise fail(str(error)) from None


def experiment_lines(page: dict[str, Any], limit: int) -> list[str]:
    """One line per experiment of a page (as the API returns it), then a note when the page
    leaves some out, so a list cut at ``limit`` is never mistaken for all of them."""
    items, total = page["items"], page["total"]
    lines = [f"{e['id']}  {e['status']:<10} {e['n_trials']:>4} trials  {e['name']}" for e in items]
    if not items and not total:
        return ["no experiments yet"]
    if len(items) < total:
        note = f"showing the {len(items)} newest of {total} experiments"
        if limit < MAX_LISTED:
            note += f"; --limit {min(total, MAX_LISTED)} shows more"
        lines.append(note)
    return lines


def trial_line(trial: dict[str, Any]) -> str:
    """One trial of ``dst status``: state, progress, accuracy, where it runs, its resume."""
    acc = (trial.get("metrics") or {}).get("test_acc")
    parts = [f"  {trial['index']:>4} {trial['state']:<10} epoch {trial['epoch']}/{trial['epochs']}"]
    parts.append(trial["label"])
    if acc is not None:
        parts.append(f"test_acc={acc:.4f}")
    if trial.get("node"):
        gpus = f" (GPU {trial['gpus']})" if trial.get("gpus") else ""
        parts.append(f"on {trial['node']}{gpus}")
    if trial.get("resumed_from_epoch"):
        parts.append(f"(resumed after epoch {trial['resumed_from_epoch']})")
    return "  ".join(parts)


ERROR_WIDTH = 160  # a trial's error in `dst status`, at most (the API has it whole)


def trial_error_line(trial: dict[str, Any], width: int = ERROR_WIDTH) -> str:
    """A trial's error under its line of ``dst status``: the error text's last line (a trace
    ends with the exception and its message), cut to ``width`` characters. A trial that is
    not failed shows the error it last resumed from."""
    lines = [line.strip() for line in trial["error"].splitlines() if line.strip()]
    text = lines[-1] if lines else "(no error text)"
    if len(text) > width:
        text = text[: width - 1] + "…"
    label = "error" if trial["state"] == TrialState.FAILED else "last error"
    return f"{'':8}{label}: {text}"


@app.command()
def cancel(experiment_id: ExperimentId, api: ApiUrl = DEFAULT_URL, token: Token = None) -> None:
    """Cancel a running experiment."""
    try:
        e = _client(api, token).cancel(experiment_id)
    except ApiError as error:
        raise fail(str(error)) from None
    typer.echo(f"{e['id']}: {e['status']}")


@app.command()
def logs(
    experiment_id: ExperimentId,
    tail: Annotated[int, typer.Option(min=1, help="lines from the end of the log")] = 200,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="then print what is added, until the end")
    ] = False,
    api: ApiUrl = DEFAULT_URL,
    token: Token = None,
) -> None:
    """The end of an experiment's job driver log on Ray; with --follow, on to its end.

    The log says why a study failed and which trials wait for resources.
    """
    client = _client(api, token)
    try:
        if not follow:
            typer.echo(client.log(experiment_id, tail), nl=False)
            return
        final = follow_log(client, experiment_id, tail, lambda text: typer.echo(text, nl=False))
    except ApiError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"status: {final['status']}", err=True)


# a follower waits on these: Ray has no job yet (404), or is away or erring for now (502, 503)
LOG_NOT_YET = frozenset({404, 502, 503})


def follow_log(
    client: ApiClient,
    experiment_id: str,
    tail: int,
    echo: Callable[[str], None],
    poll: float = 2.0,
) -> dict[str, Any]:
    """Echo the last ``tail`` lines of the experiment's driver log, then what the driver adds,
    until the experiment ends; its last state. Each line is echoed once, whole logs included:
    each read asks only for what follows the characters already read. A 503 answer to the
    experiment's state (the API's database away for now) is asked again, for a while."""
    read: int | None = None  # characters of the log echoed so far
    while True:
        # first: a log read after the end is whole
        experiment = through_unavailable(lambda: client.experiment(experiment_id), poll)
        ended = experiment["status"] in TERMINAL
        if experiment["status"] != ExperimentStatus.QUEUED:  # submitted: Ray has (or will have) it
            try:
                text, length = client.log_chunk(
                    experiment_id, tail=tail if read is None else None, since=read
                )
            except ApiError as error:
                if ended or error.status not in LOG_NOT_YET:
                    raise
            else:
                echo(text)
                read = length
        if ended:
            return experiment
        time.sleep(poll)


@app.command()
def spec(experiment_id: ExperimentId, api: ApiUrl = DEFAULT_URL, token: Token = None) -> None:
    """The experiment's study spec as stored, as YAML (defaults filled in): save it and submit
    it again to rerun the study."""
    import yaml

    try:
        stored = _client(api, token).spec(experiment_id)
    except ApiError as error:
        raise fail(str(error)) from None
    typer.echo(yaml.safe_dump(stored, sort_keys=False, allow_unicode=True), nl=False)


@app.command()
def results(experiment_id: ExperimentId, api: ApiUrl = DEFAULT_URL, token: Token = None) -> None:
    """Final test accuracy and loss, mean ± std over seeds, per configuration."""
    try:
        typer.echo(results_table(_client(api, token).results(experiment_id)))
    except ApiError as error:
        raise fail(str(error)) from None


def _study(spec_path: Path | None, preset: str | None, overrides: list[str]) -> dict[str, Any]:
    """The study to submit: a spec file or a preset, with ``key.path=value`` overrides
    (applied alike to both, so an override that works with one works with the other)."""
    from service.presets import override_study, preset_study, presets

    if (spec_path is None) == (preset is None):
        raise fail("give either a SPEC file or --preset NAME")
    if preset is not None and preset not in presets():
        raise fail(f"no preset {preset!r}; one of: {', '.join(presets())}")
    try:
        parsed = _parse_overrides(overrides)
        if preset is not None:
            return json_ready(override_study(preset_study(preset), parsed))
        assert spec_path is not None  # one of the two, as checked above
        return json_ready(override_study(read_study(spec_path), parsed))
    except ValueError as error:
        raise fail(str(error)) from None


def read_study(path: Path) -> dict[str, Any]:
    """The study data of a YAML (or JSON) spec file; ``ValueError`` with a one-line message
    naming the file when it cannot be read, is not YAML, or is not a mapping of fields."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the spec file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the spec file is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {yaml_problem(error)}") from None
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ValueError(
            f"{path}: the top level must be a mapping of the study spec's fields "
            f"(name, model, dataset, grid, ...), got {found}"
        )
    return data


def json_ready(value: Any, path: str = "") -> Any:
    """``value`` (YAML data) as JSON can carry it to the API: a date or time (YAML reads an
    unquoted ``2024-05-01`` as a date) becomes its ISO text, and a mapping's keys become text
    (JSON's keys are strings); a number that is not finite, or a value JSON has no form for
    (a YAML set, binary), is a ``ValueError`` naming the field."""
    if isinstance(value, dict):
        ready: dict[str, Any] = {}
        for key, item in value.items():
            text = json_key(key, path)
            if text in ready:
                raise ValueError(f"{path or 'spec'}: two keys are both {text!r} as text")
            ready[text] = json_ready(item, f"{path}.{text}" if path else text)
        return ready
    if isinstance(value, list):
        return [json_ready(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path or 'spec'}: {value} is not a finite number")
    if value is not None and not isinstance(value, str | int | float):
        raise ValueError(f"{path or 'spec'}: a {type(value).__name__} is not a spec value")
    return value


def json_key(key: Any, path: str = "") -> str:
    """A mapping's key as JSON text, written as JSON would write it (``true``, ``1.5``; a date
    as its ISO text); a key JSON has no text for (YAML binary data as a key, a number
    that is not finite) is a ``ValueError`` naming the mapping."""
    where = path or "spec"
    if isinstance(key, str):
        return key
    if isinstance(key, datetime.date | datetime.time):
        return key.isoformat()
    if isinstance(key, float) and not math.isfinite(key):
        raise ValueError(f"{where}: the key {key} is not a finite number")
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)
    raise ValueError(f"{where}: a {type(key).__name__} is not a key of a spec mapping")


def yaml_problem(error: Exception) -> str:
    """A YAML parse error on one line: what is wrong and where (PyYAML's own message spans
    several lines and quotes the source)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set key.path=value`` items as a mapping; a value that is not YAML is a one-line
    ``ValueError`` naming the item."""
    import yaml

    from service.presets import parse_overrides

    parsed: dict[str, Any] = {}
    for item in items:
        try:
            parsed |= parse_overrides([item])
        except yaml.YAMLError as error:
            raise ValueError(f"--set {item!r}: invalid YAML value: {yaml_problem(error)}") from None
    return parsed


@app.command()
def presets() -> None:
    """The paper's experiments as presets: name, DST runs of the grid, description."""
    from service.presets import presets as known

    for preset in known().values():
        n_grid = 1
        for values in preset.study.get("grid", {}).values():
            n_grid *= len(values)
        typer.echo(f"{preset.name:36} {n_grid:5} runs  {preset.description}")


@app.command()
def report(
    experiment_id: ExperimentId,
    out: Annotated[Path, typer.Option(help="directory to write report.html into")] = Path("."),
    api: ApiUrl = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Write a self-contained HTML report of a study: results, rankings, figures, links."""
    from service.report import write_report

    try:
        path = write_report(_client(api, token), experiment_id, out, progress=True)
    except ApiError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"cannot write the report into --out {out}: {error.strerror or error}") from None
    typer.echo(f"report: {path}")


@app.command()
def demo(
    spec_path: Annotated[Path, typer.Option("--spec", help="study to run")] = EXAMPLES
    / "demo.yaml",
    keep_open: Annotated[
        bool, typer.Option(help="keep API, Ray and MLflow up until Ctrl-C")
    ] = False,
) -> None:
    """Start everything locally, run a real small study on digits over REST, show results."""
    from service.local import free_port

    study = _checked_study(spec_path)  # a spec that is no study fails before anything starts
    storage = _settings().storage_path / "demo" / time.strftime("%Y%m%d-%H%M%S")
    storage.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    settings = _settings(
        storage_path=storage,
        database_url=f"sqlite:///{storage / 'dstlab.db'}",
        api_token=token,
        port=free_port(),
        reconcile_interval_s=1,
    )
    typer.echo(f"starting local Ray, MLflow and the API (state in {storage}) ...")
    try:
        with running_api(settings) as url:
            typer.echo(f"API on {url} (docs: {url}/docs)")
            wait_ready(url)
            final = _demo_study(ApiClient(url, token), study, storage / "report")
            if keep_open:
                typer.echo("services stay up; Ctrl-C to stop")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    except (StartError, ApiError) as error:
        raise fail(str(error)) from None
    typer.echo(
        "stopped. Browse the runs again with: "
        f"uv run mlflow ui --backend-store-uri sqlite:///{storage / 'mlflow' / 'mlflow.db'}"
    )
    if final["status"] != ExperimentStatus.SUCCEEDED:
        raise typer.Exit(code=1)


def _checked_study(spec_path: Path) -> dict[str, Any]:
    """The study of ``spec_path``, validated here as the API would validate it (the API may
    also refuse it for its limits); a bad one exits with the fields named."""
    from pydantic import ValidationError

    from dst.cli import format_validation_error
    from service.study import StudySpec

    try:
        study = json_ready(read_study(spec_path))
        StudySpec.model_validate(study)
    except ValidationError as error:
        raise fail(f"{spec_path}: {format_validation_error(error)}") from None
    except ValueError as error:
        raise fail(str(error)) from None
    return study


def _demo_study(client: ApiClient, study: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """Submit ``study``, show its progress, results, report and MLflow address; return its
    final state."""
    from service.report import write_report

    created = client.submit(study, idempotency_key="demo")
    typer.echo(f"submitted experiment {created['id']} ({created['n_trials']} trials)")
    final = wait_for(client, created["id"])
    typer.echo(f"status: {final['status']}")
    typer.echo(results_table(client.results(created["id"])))
    # the report is written while the API closes the MLflow parent run in the background
    typer.echo(f"report: {write_report(client, created['id'], report_dir)}")
    mlflow = final.get("mlflow") or {}
    if not wait_parent_closed(client, created["id"]):
        typer.echo("the MLflow parent run is not closed yet (MLflow did not answer)")
    typer.echo(f"MLflow UI: {mlflow.get('experiment_url') or mlflow.get('tracking_uri')}")
    return final
