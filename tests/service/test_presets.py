"""The paper's experiments as presets: every one a valid study within the trial limit, with
overrides applied where they say, over REST (422 naming the field, nothing stored) and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dst.cli import app as cli
from service.presets import parse_overrides, preset_study, presets
from service.study import StudySpec, expand
from tests.service.test_api import AUTH, unreachable_app

FIGURES = {"1", "5", "6", "7", "15", "16"}


def test_every_preset_is_a_valid_study_within_the_limit() -> None:
    assert len(presets()) >= 14
    for name, preset in presets().items():
        study = StudySpec.model_validate(preset.study)
        assert study.tags["preset"] == name and study.name == name
        assert preset.description.startswith(("Figure", "ResNet-50")), name
        assert 0 < len(expand(study)) <= 1000, name
    assert {p.study["tags"]["figure"] for p in presets().values()} == FIGURES


def test_the_figure_1_grid_is_the_papers() -> None:
    study = StudySpec.model_validate(presets()["fig1-resnet56-cifar10"].study)
    assert study.grid["sparsity.density"] == [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert study.grid["sparsity.growth"] == ["random", "gradient"]
    assert len(study.grid["seed"]) == 5 and study.sparsity.update_period == 800
    assert study.sparsity.prune_fraction == 0.5 and study.sparsity.schedule == "cosine"
    assert study.baselines.dense and study.baselines.static
    imagenet = StudySpec.model_validate(presets()["resnet50-imagenet"].study)
    assert imagenet.sparsity.density == 0.2 and imagenet.sparsity.growth == "gradient"


def test_overrides_replace_whole_grid_fields_and_nested_values() -> None:
    overrides = parse_overrides(["grid.sparsity.density=[0.1]", "training.epochs=3", "seed=7"])
    study = preset_study("fig1-small-mlp-higgs", overrides)
    assert study["grid"]["sparsity.density"] == [0.1]
    assert study["training"] == {"epochs": 3} and study["seed"] == 7
    assert presets()["fig1-small-mlp-higgs"].study["grid"]["sparsity.density"][0] == 0.05
    with pytest.raises(ValueError, match="not a section"):
        preset_study("fig1-small-mlp-higgs", {"model.depth": 3})
    with pytest.raises(ValueError, match=r"key\.path=value"):
        parse_overrides(["epochs"])


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(unreachable_app(tmp_path)) as test_client:
        yield test_client


def test_presets_over_rest(client: TestClient) -> None:
    listed = client.get("/presets", headers=AUTH).json()
    assert [p["name"] for p in listed] == list(presets())
    small = {"grid.seed": [0], "grid.sparsity.density": [0.1], "training.epochs": 1}
    created = client.post(
        "/presets/fig1-small-mlp-higgs/experiments", json={"overrides": small}, headers=AUTH
    )
    assert created.status_code == 201, created.text
    assert created.json()["n_trials"] == 6 * 2 + 2  # criteria x growths, dense and static
    assert created.json()["name"] == "fig1-small-mlp-higgs"


def test_bad_preset_requests_name_the_field_and_store_nothing(client: TestClient) -> None:
    unknown = client.post("/presets/fig99/experiments", json={}, headers=AUTH)
    assert unknown.status_code == 422
    assert "fig1-small-mlp-higgs" in unknown.text  # the allowed names
    bad = client.post(
        "/presets/fig6-structure/experiments",
        json={"overrides": {"sparsity.density": 2}},
        headers=AUTH,
    )
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "overrides", "sparsity", "density"]
    outside = client.post(
        "/presets/fig6-structure/experiments",
        json={"overrides": {"data.root": "/elsewhere"}},
        headers=AUTH,
    )
    assert outside.status_code == 422
    assert outside.json()["detail"][0]["loc"] == ["body", "overrides", "data", "root"]
    misspelt = client.post(  # not the whole preset, launched without the override meant
        "/presets/fig6-structure/experiments",
        json={"override": {"training.epochs": 1}},
        headers=AUTH,
    )
    assert misspelt.status_code == 422, misspelt.text
    assert misspelt.json()["detail"][0]["loc"] == ["body", "override"]
    assert client.get("/experiments", headers=AUTH).json()["total"] == 0


def test_a_preset_needs_no_body(client: TestClient) -> None:
    """Every field of the body is optional, so the body is too: none submits the preset as
    it is, like ``{}``."""
    bare = client.post("/presets/fig1-small-mlp-higgs/experiments", headers=AUTH)
    assert bare.status_code == 201, bare.text
    empty = client.post("/presets/fig1-small-mlp-higgs/experiments", json={}, headers=AUTH)
    assert empty.status_code == 201 and empty.json()["n_trials"] == bare.json()["n_trials"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"grid": 5, "grid.seed": [0]},
        {"grid": [], "grid.seed": [0]},
        {"tags": "x", "tags.a": "b"},
    ],
)
def test_a_key_set_in_a_section_an_earlier_override_replaced_is_422_naming_it(
    client: TestClient, overrides: dict[str, object]
) -> None:
    """``grid.<field>`` and ``tags.<key>`` set a key in their section: after an override
    that made the section a plain value there is none to set it in."""
    key = list(overrides)[1]
    with pytest.raises(ValueError, match=f"cannot set '{key}'"):
        preset_study("fig6-structure", overrides)
    response = client.post(
        "/presets/fig6-structure/experiments", json={"overrides": overrides}, headers=AUTH
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "overrides"]
    assert f"cannot set '{key}'" in error["msg"] and "is not a section" in error["msg"]
    assert client.get("/experiments", headers=AUTH).json()["total"] == 0


def test_a_nul_in_an_override_is_422_naming_the_field(client: TestClient) -> None:
    response = client.post(
        "/presets/fig6-structure/experiments",
        json={"overrides": {"tags.note": "a\x00b"}},
        headers=AUTH,
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "overrides"]
    assert "tags.note: 'a\\x00b' contains a NUL character" in error["msg"]
    assert client.get("/experiments", headers=AUTH).json()["total"] == 0


def test_the_cli_lists_presets_and_refuses_an_unknown_one() -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["presets"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in presets())
    unknown = runner.invoke(cli, ["submit", "--preset", "nope", "--api", "http://127.0.0.1:9"])
    assert unknown.exit_code != 0 and "fig5-update-period" in unknown.output
    both = runner.invoke(cli, ["submit", "x.yaml", "--preset", "fig6-structure"])
    assert both.exit_code != 0 and "either" in both.output
