"""The REST API over a real database, with Ray and MLflow unreachable.

Nothing here needs a running Ray or MLflow: validation and authentication happen before either
is touched, and a valid study whose launch fails stays stored as ``queued`` (the reconciler
retries it), which is itself behaviour worth pinning down.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from service import crud, lifecycle
from service.core.config import Settings
from service.execution import RayExecutor
from service.main import create_app
from service.states import ExperimentStatus
from service.tracking import MlflowTracker
from tests.service.conftest import fresh_database
from tests.service.e2e import wait_for

TOKEN = "test-token-abcdef0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UNREACHABLE = "http://127.0.0.1:9"


def valid_study(**extra: Any) -> dict[str, Any]:
    return {
        "name": "api-test",
        "model": "small-mlp",
        "dataset": "digits",
        "training": {"epochs": 1},
        "sparsity": {"density": 0.1, "update_period": 10},
        "grid": {"sparsity.criterion": ["magnitude", "snip"]},
    } | extra


def unreachable_app(storage: Path, **settings: Any) -> FastAPI:
    """The API on a SQLite database in ``storage``, with Ray and MLflow unreachable and the
    background pass once an hour (so only what a request asks for is launched)."""
    base = Settings(
        storage_path=storage,
        database_url=f"sqlite:///{storage / 'api.db'}",
        api_token=TOKEN,
        reconcile_interval_s=3600,
    )
    config = base.model_copy(update=settings)
    return create_app(config, RayExecutor(UNREACHABLE, timeout=1), MlflowTracker(UNREACHABLE))


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    app = unreachable_app(tmp_path, max_trials=20)
    with TestClient(app) as test_client:
        yield test_client


def stored(client: TestClient) -> int:
    return int(client.get("/experiments", headers=AUTH).json()["total"])


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/experiments"),
        ("POST", "/experiments"),
        ("GET", "/experiments/abc"),
        ("GET", "/experiments/abc/trials"),
        ("GET", "/experiments/abc/spec"),
        ("POST", "/experiments/abc/cancel"),
        ("GET", "/experiments/abc/results"),
        ("GET", "/experiments/abc/log"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["missing", "wrong", "basic-scheme", "no-scheme"],
)
def test_every_experiment_endpoint_needs_the_token(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.request(method, path, headers=headers, json=valid_study())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text


def test_right_token_is_accepted_and_health_needs_none(client: TestClient) -> None:
    assert client.get("/experiments", headers=AUTH).status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").status_code == 200


def test_readyz_reports_each_dependency(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "database": True, "ray": False, "mlflow": False}


# --- validation: a table of invalid specs ------------------------------------------------------


def with_(**changes: Any) -> dict[str, Any]:
    spec = valid_study()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is DROP:
            node.pop(leaf)
        else:
            node[leaf] = value
    return spec


DROP = object()
MANY_SEEDS = {"sparsity.criterion": ["magnitude", "snip"], "seed": list(range(11))}

INVALID: list[tuple[str, dict[str, Any], list[Any], str]] = [
    ("unknown model", with_(model="gpt-5"), ["body", "model"], "small-mlp"),
    ("unknown dataset", with_(dataset="mnist-but-not"), ["body", "dataset"], "digits"),
    ("unknown criterion", with_(sparsity__criterion="biggest"), ["body", "sparsity", "criterion"], "magnitude"),
    ("unknown growth", with_(sparsity__growth="hebbian"), ["body", "sparsity", "growth"], "gradient"),
    ("unknown schedule", with_(sparsity__schedule="step"), ["body", "sparsity", "schedule"], "cosine"),
    ("unknown init", with_(sparsity__init="xavier"), ["body", "sparsity", "init"], "erk"),
    ("density zero", with_(sparsity__density=0), ["body", "sparsity", "density"], "greater than 0"),
    ("density above one", with_(sparsity__density=1.5), ["body", "sparsity", "density"], "less than or equal to 1"),
    ("prune fraction one", with_(sparsity__prune_fraction=1.0), ["body", "sparsity", "prune_fraction"], "less than 1"),
    ("update period zero", with_(sparsity__update_period=0), ["body", "sparsity", "update_period"], "greater than or equal to 1"),
    ("epochs zero", with_(training__epochs=0), ["body", "training", "epochs"], "greater than or equal to 1"),
    ("negative seed", with_(seed=-1), ["body", "seed"], "greater than or equal to 0"),
    ("bad device", with_(device="tpu"), ["body", "device"], "cuda"),
    ("missing name", with_(name=DROP), ["body", "name"], "required"),
    ("name too long", with_(name="n" * 201), ["body", "name"], "at most 200 characters"),
    ("unknown field", with_(colour="red"), ["body", "colour"], "not permitted"),
    ("unknown sparsity field", with_(sparsity__sparsness=0.1), ["body", "sparsity", "sparsness"], "not permitted"),
    ("zero cpus", with_(resources__cpus_per_trial=0), ["body", "resources", "cpus_per_trial"], "greater than 0"),
    ("zero workers", with_(resources__workers_per_trial=0), ["body", "resources", "workers_per_trial"], "greater than or equal to 1"),
    ("empty grid list", with_(grid={"sparsity.density": []}), ["body", "grid"], "empty list"),
    ("grid over unknown field", with_(grid={"sparsity.colour": [1]}), ["body", "grid"], "allowed fields"),
    ("bad grid value", with_(grid={"sparsity.criterion": ["snip", "biggest"]}), ["body", "grid"], "grid.sparsity.criterion[1]"),
    ("grid density out of range", with_(grid={"density": [0.1, 2]}), ["body", "grid"], "grid.sparsity.density[1]"),
    ("incompatible model and dataset", with_(model="small-cnn", dataset="breast_cancer"), ["body", "dataset"], "tabular"),
    ("incompatible grid combination", with_(grid={"model": ["small-cnn"], "dataset": ["digits", "breast_cancer"]}), ["body", "grid"], "grid combination {'model': 'small-cnn', 'dataset': 'breast_cancer'}"),
    ("invalid dense dropout baseline", with_(model="small-cnn", baselines={"dense_dropout": 0.05}), ["body", "baselines", "dense_dropout"], "available for small-mlp"),
    ("nesterov without momentum", with_(training__nesterov=True, training__momentum=0), ["body", "training", "nesterov"], "momentum > 0"),
    ("too many trials", with_(grid=MANY_SEEDS), ["body", "grid"], "limit is 20"),
    ("cuda without gpus", with_(device="cuda"), ["body", "resources", "gpus_per_trial"], "device 'cuda' needs"),
    ("gpu idle on cpu", with_(resources__gpus_per_trial=1), ["body", "device"], "GPU idle"),
    ("gpu idle on a cpu in the grid", with_(resources__gpus_per_trial=1, grid={"device": ["cpu"]}), ["body", "grid", "device"], "GPU idle"),
    ("batch below workers", with_(training__batch_size=2, resources__workers_per_trial=4), ["body", "resources", "workers_per_trial"], "batch_size = 2"),
    ("fused kernel on cpu", with_(training__optimizer_kernel="fused"), ["body", "training", "optimizer_kernel"], "CUDA only"),
    ("baselines typo", with_(baselines={"dens": True}), ["body", "baselines", "dens"], "not permitted"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "loc", "needle"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_specs_are_422_with_the_field_path_and_nothing_is_stored(
    client: TestClient, spec: dict[str, Any], loc: list[Any], needle: str
) -> None:
    response = client.post("/experiments", json=spec, headers=AUTH)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    matching = [e for e in errors if e["loc"] == loc]
    assert matching, f"no error at {loc}: {errors}"
    assert any(needle in e["msg"] for e in matching), matching
    assert stored(client) == 0


def test_invalid_specs_table_is_large_enough() -> None:
    assert len(INVALID) >= 15


@pytest.fixture(scope="module")
def postgres_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The API on a fresh PostgreSQL database (whose text columns refuse NUL)."""
    with fresh_database("dstlab_api") as name:
        app = unreachable_app(
            tmp_path_factory.mktemp("api-postgres"),
            database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        )
        with TestClient(app) as test_client:
            yield test_client


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"name": "a\x00b"}, "name: 'a\\x00b' contains a NUL character"),
        ({"tags": {"k\x00": "v"}}, "tags.k\\x00: 'k\\x00' contains a NUL character"),
        ({"tags": {"k": "v\x00"}}, "tags.k: 'v\\x00' contains a NUL character"),
        ({"tags": {"\ud800": "v"}}, "tags.\\ud800: '\\ud800' is not valid Unicode"),
        ({"grid": {"\ud800": [1]}}, "grid.\\ud800: '\\ud800' is not valid Unicode"),
    ],
    ids=[
        "nul-in-name",
        "nul-in-tag-key",
        "nul-in-tag-value",
        "surrogate-tag-key",
        "surrogate-grid-key",
    ],
)
def test_text_that_cannot_be_stored_is_422_naming_the_field_and_nothing_is_stored(
    postgres_client: TestClient, extra: dict[str, Any], needle: str
) -> None:
    """NUL and lone surrogates, in values and keys, on PostgreSQL: a 422 whose message names
    the field and shows the text escaped; no experiment is stored."""
    body = json.dumps(valid_study(**extra))  # ASCII JSON: NUL and surrogates as \u escapes
    response = postgres_client.post(
        "/experiments", content=body, headers=AUTH | {"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body"] and needle in error["msg"], error
    assert stored(postgres_client) == 0


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("get", ""), ("get", "/trials"), ("get", "/results"), ("post", "/cancel")],
)
def test_an_id_no_experiment_can_have_is_404_on_postgres(
    postgres_client: TestClient, method: str, suffix: str
) -> None:
    """Ids are 32 hex digits; anything else (a NUL, which PostgreSQL's text refuses) is an
    unknown experiment, not a 500."""
    for bad in ("a%00b", "0" * 31 + "%00", "not-an-id"):
        response = postgres_client.request(method, f"/experiments/{bad}{suffix}", headers=AUTH)
        assert response.status_code == 404, (bad, response.text)
        assert "no experiment" in response.json()["detail"]


def test_the_longest_name_stores_trials_whose_specs_read_back(client: TestClient) -> None:
    """Trials are named "<study name>/<index>": with the longest study name their stored
    specs still read back as run specs, so trials and results can be shown."""
    name = "n" * 200
    created = client.post("/experiments", json=valid_study(name=name), headers=AUTH)
    assert created.status_code == 201, created.text
    path = f"/experiments/{created.json()['id']}"
    trials = client.get(f"{path}/trials", headers=AUTH).json()
    assert [t["params"]["name"] for t in trials] == [f"{name}/0", f"{name}/1"]
    results = client.get(f"{path}/results", headers=AUTH)
    assert results.status_code == 200 and results.json()["group_by"] == ["sparsity.criterion"]


def test_repeated_grid_values_count_once_against_the_trial_limit(client: TestClient) -> None:
    """A value listed twice adds no trial: 2 x 2 distinct values are 4 trials, within the
    limit of 20, although the lists name 12 x 4 = 48 combinations."""
    grid = {"sparsity.criterion": ["magnitude", "snip"] * 6, "seed": [0, 1, 1, 0]}
    response = client.post("/experiments", json=valid_study(grid=grid), headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["n_trials"] == 4


# --- storing and reading -----------------------------------------------------------------------


def test_a_study_whose_launch_fails_stays_queued_with_its_trials(client: TestClient) -> None:
    response = client.post("/experiments", json=valid_study(), headers=AUTH)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "queued" and body["n_trials"] == 2
    assert body["trial_counts"] == {"pending": 2}
    assert body["error"] is None  # launching happens after the answer, in the background
    path = f"/experiments/{body['id']}"
    wait_for(lambda: client.get(path, headers=AUTH).json()["error"], "the launch to fail", 30)
    assert "launch failed" in client.get(path, headers=AUTH).json()["error"]
    assert client.get(path, headers=AUTH).json()["status"] == "queued"
    trials = client.get(f"/experiments/{body['id']}/trials", headers=AUTH).json()
    assert [t["params"]["sparsity.criterion"] for t in trials] == ["magnitude", "snip"]
    assert all(t["state"] == "pending" and t["epoch"] == 0 and t["epochs"] == 1 for t in trials)
    results = client.get(f"/experiments/{body['id']}/results", headers=AUTH).json()
    assert results == {
        "experiment_id": body["id"],
        "status": "queued",
        "complete": False,
        "group_by": ["sparsity.criterion"],
        "rows": [],
    }


def test_idempotency_key_returns_the_same_experiment(client: TestClient) -> None:
    headers = AUTH | {"Idempotency-Key": "retry-me"}
    first = client.post("/experiments", json=valid_study(), headers=headers)
    second = client.post("/experiments", json=valid_study(), headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/experiments", json=valid_study(), headers=AUTH)
    assert other.json()["id"] != first.json()["id"]
    assert stored(client) == 2


def test_list_is_paginated_and_filtered_by_status(client: TestClient) -> None:
    ids = [
        client.post("/experiments", json=valid_study(name=f"s{i}"), headers=AUTH).json()["id"]
        for i in range(3)
    ]
    cancelled = client.post(f"/experiments/{ids[0]}/cancel", headers=AUTH).json()
    assert cancelled["status"] == "cancelled"  # queued: cancelled at once
    assert cancelled["trial_counts"] == {"cancelled": 2}
    page = client.get("/experiments", params={"limit": 2}, headers=AUTH).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = client.get("/experiments", params={"limit": 2, "offset": 2}, headers=AUTH).json()
    assert {e["id"] for e in page["items"] + rest["items"]} == set(ids)
    queued = client.get("/experiments", params={"status": "queued"}, headers=AUTH).json()
    assert {e["id"] for e in queued["items"]} == set(ids[1:])
    bad = client.get("/experiments", params={"status": "sleeping"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "status"]


def test_a_job_that_ends_while_being_cancelled_is_409_not_a_cancel(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment read live, then its job ended before the cancel moved it: the answer
    says it ended (409), not 200 with a "cancel" that did nothing."""
    experiment_id = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    services = client.app.state.services  # type: ignore[attr-defined]
    with Session(services.engine) as session:
        crud.set_experiment_status(session, experiment_id, ExperimentStatus.RUNNING)
        session.commit()
    cancel = lifecycle.cancel

    def job_ends_first(services: Any, experiment_id: str) -> bool:
        with Session(services.engine) as session:
            crud.set_experiment_status(session, experiment_id, ExperimentStatus.SUCCEEDED)
            session.commit()
        return cancel(services, experiment_id)

    monkeypatch.setattr(lifecycle, "cancel", job_ends_first)
    answer = client.post(f"/experiments/{experiment_id}/cancel", headers=AUTH)
    assert answer.status_code == 409, answer.text
    assert "already succeeded" in answer.json()["detail"]


def test_unknown_experiment_is_404(client: TestClient) -> None:
    for path in (
        "/experiments/nope",
        "/experiments/nope/trials",
        "/experiments/nope/spec",
        "/experiments/nope/results",
        "/experiments/nope/log",
    ):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404 and "nope" in response.json()["detail"]
    assert client.post("/experiments/nope/cancel", headers=AUTH).status_code == 404


# --- the driver's log ------------------------------------------------------------------------


def driver_output(experiment_id: str) -> str:
    return "".join(f"{experiment_id} line {i}\n" for i in range(500))


def connections_by_thread(engine: Engine) -> Counter[int]:
    """How many pooled connections each thread holds, kept up to date from now on. Per thread,
    because the background launcher may hold a connection of its own at the same moment."""
    held: Counter[int] = Counter()

    def checkout(_connection: object, record: Any, _proxy: object) -> None:
        record.info["holder"] = threading.get_ident()
        held[record.info["holder"]] += 1

    def checkin(_connection: object, record: Any) -> None:
        if "holder" in record.info:
            held[record.info.pop("holder")] -= 1

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    return held


def test_the_log_is_the_end_of_the_drivers_output(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    services = client.app.state.services  # type: ignore[attr-defined]
    held = connections_by_thread(services.engine)

    def logs(experiment_id: str) -> str:
        assert held[threading.get_ident()] == 0  # the request holds no connection while Ray answers
        return driver_output(experiment_id)

    monkeypatch.setattr(services.executor, "logs", logs)
    path = f"/experiments/{experiment}/log"
    three = client.get(path, params={"tail": 3}, headers=AUTH)
    assert three.status_code == 200 and three.headers["content-type"].startswith("text/plain")
    assert three.text == "".join(f"{experiment} line {i}\n" for i in (497, 498, 499))
    default = client.get(path, headers=AUTH).text.splitlines()
    assert len(default) == 200 and default[0] == f"{experiment} line 300"
    whole = client.get(path, params={"tail": 100_000}, headers=AUTH).text
    assert whole == driver_output(experiment)
    monkeypatch.setattr(services.executor, "logs", lambda _: "10%\r50%\r100%\ndone\n")
    assert client.get(path, params={"tail": 2}, headers=AUTH).text == "10%\r50%\r100%\ndone\n"
    for bad in (0, 100_001, "all"):
        refused = client.get(path, params={"tail": bad}, headers=AUTH)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == [
            "query",
            "tail",
        ]


def test_a_reader_reads_on_from_where_an_earlier_answer_ended(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``since`` counts characters (not bytes), as X-Log-Length does; a log shorter than what
    was read is a new one, given whole."""
    experiment = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    log = ["é 1\né 2\né"]
    monkeypatch.setattr(
        client.app.state.services.executor,  # type: ignore[attr-defined]
        "logs",
        lambda _: "".join(log),
    )
    path = f"/experiments/{experiment}/log"

    def read(**params: Any) -> tuple[str, int]:
        answer = client.get(path, params=params, headers=AUTH)
        assert answer.status_code == 200, answer.text
        return answer.text, int(answer.headers["x-log-length"])

    assert read(tail=1) == ("é", 9)
    log.append(" 3 done\n")
    assert read(since=9) == (" 3 done\n", 17)
    assert read(since=17) == ("", 17)
    assert read(since=4, tail=1) == ("é 3 done\n", 17)  # at most its last lines
    assert read(since=1000) == ("".join(log), 17)
    refused = client.get(path, params={"since": -1}, headers=AUTH)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["query", "since"]


def test_a_log_ray_does_not_have_is_a_404_that_says_why(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_job(experiment_id: str) -> str:
        raise LookupError(f"Ray has no job {experiment_id}")

    monkeypatch.setattr(client.app.state.services.executor, "logs", no_job)  # type: ignore[attr-defined]
    queued = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    response = client.get(f"/experiments/{queued}/log", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["detail"].endswith("it has not been submitted yet")
    cancelled = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    client.post(f"/experiments/{cancelled}/cancel", headers=AUTH)
    response = client.get(f"/experiments/{cancelled}/log", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["detail"].endswith("never submitted, or Ray no longer keeps its job")


def test_the_log_while_ray_does_not_answer_is_a_503_and_loses_nothing(
    client: TestClient,
) -> None:
    experiment = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    response = client.get(f"/experiments/{experiment}/log", headers=AUTH)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "Ray's Jobs API did not answer" in response.json()["detail"]
    assert client.get(f"/experiments/{experiment}", headers=AUTH).status_code == 200
    assert stored(client) == 1


def test_an_error_answer_from_ray_is_a_502_that_quotes_it(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def agent_down(experiment_id: str) -> str:
        raise RuntimeError("Request failed with status code 500: the job agent is unreachable")

    monkeypatch.setattr(client.app.state.services.executor, "logs", agent_down)  # type: ignore[attr-defined]
    experiment = client.post("/experiments", json=valid_study(), headers=AUTH).json()["id"]
    response = client.get(f"/experiments/{experiment}/log", headers=AUTH)
    assert response.status_code == 502
    assert "status code 500: the job agent is unreachable" in response.json()["detail"]
