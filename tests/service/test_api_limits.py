"""Input the API must refuse cleanly: non-finite numbers, integers beyond what the database and
the trainer hold, invalid Unicode, oversized bodies and tag sets, data locations outside the
operator's data directories, a reused Idempotency-Key with another body, oversized grids.
Each is a 4xx that names the field, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.test_api import AUTH, stored, unreachable_app, valid_study


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def client(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    app = unreachable_app(tmp_path, data_dir=data_dir, max_body_bytes=1_048_576)
    with TestClient(app) as test_client:
        yield test_client


def post_raw(client: TestClient, text: str, **headers: str) -> Any:
    return client.post(
        "/experiments",
        content=text.encode("utf-8", "surrogatepass"),
        headers=AUTH | {"content-type": "application/json"} | headers,
    )


def field_of(response: Any) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in response.json()["detail"]]


@pytest.mark.parametrize(
    ("path", "literal"),
    [
        ("sparsity.density", "NaN"),
        ("training.lr", "Infinity"),
        ("training.lr", "-Infinity"),
        ("training.weight_decay", "Infinity"),
        ("sparsity.mest_lambda", "Infinity"),
        ("resources.cpus_per_trial", "Infinity"),
        ("resources.gpus_per_trial", "NaN"),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field(
    client: TestClient, path: str, literal: str
) -> None:
    section, leaf = path.split(".")
    spec = valid_study()
    spec.setdefault(section, {})[leaf] = "__X__"
    response = post_raw(client, json.dumps(spec).replace('"__X__"', literal))
    assert response.status_code == 422, response.text
    assert f"body.{path}" in field_of(response)
    assert stored(client) == 0


BIG = 2**63
OUT_OF_RANGE = [
    ("training.epochs", BIG),
    ("training.epochs", 2**31),
    ("seed", 10**30),
    ("sparsity.update_period", 10**30),
    ("training.num_workers", 10**6),
    ("training.batch_size", BIG),
    ("sparsity.stop_step", BIG),
    ("training.max_steps_per_epoch", BIG),
    ("resources.workers_per_trial", BIG),
    ("resources.max_concurrent_trials", BIG),
]


@pytest.mark.parametrize(("path", "value"), OUT_OF_RANGE)
def test_integers_beyond_their_range_are_422(client: TestClient, path: str, value: int) -> None:
    spec = valid_study()
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    response = client.post("/experiments", json=spec, headers=AUTH)
    assert response.status_code == 422, response.text
    assert f"body.{path}" in field_of(response)
    assert stored(client) == 0


@pytest.mark.parametrize("offset", [2**63, 2**31])
def test_query_integers_are_bounded(client: TestClient, offset: int) -> None:
    response = client.get("/experiments", params={"offset": offset}, headers=AUTH)
    assert response.status_code == 422 and field_of(response) == ["query.offset"]
    log = client.get("/experiments/e1/log", params={"since": 2**63}, headers=AUTH)
    assert log.status_code == 422 and field_of(log) == ["query.since"]


def test_a_lone_surrogate_is_422(client: TestClient) -> None:
    text = json.dumps(valid_study(name="x")).replace('"name": "x"', '"name": "a\\ud800b"')
    response = post_raw(client, text)
    assert response.status_code == 422, response.text
    assert "not valid Unicode" in response.text
    tagged = json.dumps(valid_study(tags={"k": "x"})).replace('"x"', '"\\udfff"')
    assert post_raw(client, tagged).status_code == 422
    assert stored(client) == 0


def test_an_oversized_body_is_413(client: TestClient) -> None:
    spec = valid_study(tags={"big": "x" * 20_000_000})
    response = client.post("/experiments", json=spec, headers=AUTH)
    assert response.status_code == 413 and "DST_MAX_BODY_BYTES" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield json.dumps(spec).encode()

    chunked = client.post("/experiments", content=chunks(), headers=AUTH)
    assert chunked.status_code == 413
    assert stored(client) == 0


@pytest.mark.parametrize(
    ("tags", "where"),
    [
        ({"k": "v" * 1_000_000}, "body.tags.k"),
        ({f"t{i}": "v" for i in range(10_000)}, "body.tags"),
        ({"k" * 300: "v"}, "body.tags.[key]"),
    ],
)
def test_tags_are_bounded(client: TestClient, tags: dict[str, str], where: str) -> None:
    response = client.post("/experiments", json=valid_study(tags=tags), headers=AUTH)
    assert response.status_code == 422, response.text[:500]
    assert any(f.startswith(where.split(".[")[0]) for f in field_of(response))
    assert len(response.content) < 100_000  # the offending input is not echoed back
    assert stored(client) == 0


def test_a_long_name_is_422(client: TestClient) -> None:
    response = client.post("/experiments", json=valid_study(name="n" * 201), headers=AUTH)
    assert response.status_code == 422 and "body.name" in field_of(response)


@pytest.mark.parametrize("root", ["/etc/../root", "/etc", "relative/data", "~/data"])
def test_data_root_outside_the_data_directory_is_422(
    client: TestClient, data_dir: Path, root: str
) -> None:
    response = client.post("/experiments", json=valid_study(data={"root": root}), headers=AUTH)
    assert response.status_code == 422, response.text
    assert field_of(response) == ["body.data.root"] and str(data_dir) in response.text
    sneaky = {"data": {"root": f"{data_dir}/../etc"}}
    assert client.post("/experiments", json=valid_study(**sneaky), headers=AUTH).status_code == 422
    grid = valid_study(grid={"data.root": [str(data_dir), "/etc"]})
    assert client.post("/experiments", json=grid, headers=AUTH).status_code == 422
    assert stored(client) == 0
    inside = valid_study(data={"root": str(data_dir / "cifar")})
    assert client.post("/experiments", json=inside, headers=AUTH).status_code == 201


def test_a_reused_idempotency_key_with_another_body_is_409(client: TestClient) -> None:
    headers = AUTH | {"Idempotency-Key": "k-1"}
    first = client.post("/experiments", json=valid_study(), headers=headers)
    other = client.post("/experiments", json=valid_study(name="other"), headers=headers)
    assert (first.status_code, other.status_code) == (201, 409)
    assert "k-1" in other.json()["detail"] and first.json()["id"] in other.json()["detail"]
    same = client.post("/experiments", json=valid_study(), headers=headers)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    assert stored(client) == 1


def test_a_grid_over_the_limit_is_refused_and_one_at_the_limit_is_stored(
    client: TestClient,
) -> None:
    densities = [round(0.1 * i, 1) for i in range(1, 11)]  # distinct: repeats count once
    huge = valid_study(grid={"seed": list(range(10_000)), "sparsity.density": densities})
    response = client.post("/experiments", json=huge, headers=AUTH)
    assert response.status_code == 422 and "100000 trials" in response.text
    at_limit = valid_study(grid={"seed": list(range(500)), "criterion": ["snip", "set"]})
    created = client.post("/experiments", json=at_limit, headers=AUTH)
    assert created.status_code == 201 and created.json()["n_trials"] == 1000
    assert stored(client) == 1


def test_the_openapi_document_lists_the_answers_the_api_gives(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    submit = paths["/experiments"]["post"]["responses"]
    assert {"200", "201", "401", "409", "413", "422"} <= set(submit)
    for path in ("/experiments/{experiment_id}", "/experiments/{experiment_id}/trials"):
        assert {"200", "401", "404", "422"} <= set(paths[path]["get"]["responses"])
    cancel = paths["/experiments/{experiment_id}/cancel"]["post"]["responses"]
    assert {"200", "401", "404", "409"} <= set(cancel)
