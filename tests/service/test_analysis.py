"""A study's analysis over REST: rankings by density split from hand-set final accuracies,
the figures it has the data for (real PNG and SVG), ``partial`` while trials run, 409 before
anything finished and 404 for a figure it does not have."""

from __future__ import annotations

import base64
import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from dst.masks import save_masks
from dst.spec import RunSpec
from service import crud
from service.analysis import (
    FINAL,
    FIRST_REMOVAL,
    INITIAL,
    FinishedTrial,
    analyze,
    experiment_masks_dir,
    first_update_fraction,
    setting_slug,
    trial_masks_dir,
)
from service.client import ApiClient
from service.figures import build_figure, figure_names, render, trial_figures
from service.report import write_report
from service.states import TrialState
from tests.service.test_api import AUTH, TOKEN, unreachable_app

# final test accuracy by (criterion, density): magnitude best at low density, snip at high
ACCURACY = {
    ("magnitude", 0.1): 0.90,
    ("set", 0.1): 0.85,
    ("snip", 0.1): 0.70,
    ("magnitude", 0.5): 0.93,
    ("set", 0.5): 0.92,
    ("snip", 0.5): 0.95,
}


def study() -> dict[str, Any]:
    return {
        "name": "analysis",
        "model": "small-mlp",
        "dataset": "digits",
        "training": {"epochs": 1},
        "grid": {
            "sparsity.criterion": ["magnitude", "set", "snip"],
            "sparsity.density": [0.1, 0.5],
            "sparsity.growth": ["random", "gradient"],
            "seed": [0, 1],
        },
        "baselines": {"dense": True, "static": True},
    }


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(unreachable_app(tmp_path)) as test_client:
        yield test_client


def finish(client: TestClient, experiment_id: str, keep_running: int = 0) -> None:
    """Mark every trial succeeded with its hand-set accuracy (seed 1 a little lower), except
    the last ``keep_running`` DST trials."""
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        trials = crud.list_trials(session, experiment_id)
        left = keep_running
        for trial in reversed(trials):
            spec = RunSpec.model_validate_json(trial.spec_json)
            s = spec.sparsity
            if s.mode == "dst" and left > 0:
                trial.state, left = TrialState.RUNNING, left - 1
                continue
            acc = {"dense": 0.97, "static": 0.6 + s.density / 10}.get(s.mode)
            acc = acc if acc is not None else ACCURACY[(s.criterion, s.density)]
            acc -= 0.01 * spec.seed
            trial.state = TrialState.SUCCEEDED
            trial.metrics_json = json.dumps({"test_acc": acc, "test_loss": 1 - acc})
        session.commit()


def submit(client: TestClient) -> str:
    answer = client.post("/experiments", json=study(), headers=AUTH)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_nothing_to_analyse_before_a_trial_finished(client: TestClient) -> None:
    experiment_id = submit(client)
    for path in ("analysis", "figures", "figures/accuracy_vs_density.png"):
        answer = client.get(f"/experiments/{experiment_id}/{path}", headers=AUTH)
        assert answer.status_code == 409, (path, answer.text)
        assert "succeeded yet; retry later" in answer.json()["detail"]
    assert client.get("/experiments/nope/analysis", headers=AUTH).status_code == 404
    client.post(f"/experiments/{experiment_id}/cancel", headers=AUTH)  # queued: ends at once
    for path in ("analysis", "figures", "figures/accuracy_vs_density.png"):
        answer = client.get(f"/experiments/{experiment_id}/{path}", headers=AUTH)
        assert answer.status_code == 409, (path, answer.text)
        assert answer.json()["detail"].endswith(
            "it ended cancelled without one: nothing to analyse"
        )


def test_rankings_by_density_split(client: TestClient) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id)
    answer = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH)
    assert answer.status_code == 200, answer.text
    analysis = answer.json()
    assert analysis["partial"] is False and analysis["n_finished"] == 24 + 2 + 4
    assert analysis["ranked_within"] == ["sparsity.density", "sparsity.growth"]
    low, high, every = (analysis["rankings"][s] for s in ("low", "high", "all"))
    assert low["criteria"] == ["magnitude", "set", "snip"]
    assert low["average_ranks"] == {"magnitude": 1.0, "set": 2.0, "snip": 3.0}
    assert low["n_groups"] == 2  # density 0.1 x two growths
    assert sorted(low["groups"], key=json.dumps) == [
        {"sparsity.density": 0.1, "sparsity.growth": "gradient"},
        {"sparsity.density": 0.1, "sparsity.growth": "random"},
    ]
    # Nemenyi CD = q_0.05(k=3)/√2·√(k(k+1)/6N) with q/√2 = 2.343 (Demšar 2006, Table 5)
    assert math.isclose(low["critical_distance"], 2.343 * math.sqrt(12 / (6 * 2)), rel_tol=1e-3)
    assert high["criteria"] == ["snip", "magnitude", "set"]
    assert every["average_ranks"] == {"magnitude": 1.5, "set": 2.5, "snip": 2.0}
    assert every["n_groups"] == 4
    assert every["friedman"] is not None and 0 <= every["friedman"]["p_value"] <= 1
    names = {f["name"] for f in analysis["figures"]}
    assert names == {
        "accuracy_vs_density",
        "critical_distance_all",
        "critical_distance_low",
        "critical_distance_high",
    }


def test_figures_are_real_images(client: TestClient) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id)
    listed = client.get(f"/experiments/{experiment_id}/figures", headers=AUTH).json()
    for figure in listed:
        png = client.get(figure["png"], headers=AUTH)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n") and len(png.content) > 10_000
        svg = client.get(figure["svg"], headers=AUTH)
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert ET.fromstring(svg.content).tag.endswith("svg")
    svg_text = client.get(
        f"/experiments/{experiment_id}/figures/critical_distance_low.svg", headers=AUTH
    ).text
    assert "CD" in svg_text and "magnitude" in svg_text
    base = f"/experiments/{experiment_id}/figures/accuracy_vs_density.png"

    def width(dpi: int) -> int:  # a PNG's IHDR chunk starts with its width
        png = client.get(base, params={"dpi": dpi}, headers=AUTH).content
        return int.from_bytes(png[16:20], "big")

    assert width(150) == 2 * width(75)
    assert client.get(base, params={"dpi": 10}, headers=AUTH).status_code == 422


def test_unknown_figures_are_404_and_name_what_exists(client: TestClient) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id)
    base = f"/experiments/{experiment_id}/figures"
    missing = client.get(f"{base}/accuracy_vs_mest_lambda.png", headers=AUTH)
    assert missing.status_code == 404 and "accuracy_vs_density" in missing.json()["detail"]
    assert client.get(f"{base}/accuracy_vs_density.gif", headers=AUTH).status_code == 404
    assert client.get(f"{base}/..%2Fetc.png", headers=AUTH).status_code == 404


def low_density_random_trials(
    client: TestClient, experiment_id: str
) -> Iterator[tuple[Any, RunSpec]]:
    """The density-0.1, random-growth DST trials (rows, writable in the open session) and
    their specs; changes are committed at the end."""
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        for trial in crud.list_trials(session, experiment_id):
            spec = RunSpec.model_validate_json(trial.spec_json)
            s = spec.sparsity
            if s.mode == "dst" and s.density == 0.1 and s.growth == "random":
                yield trial, spec
        session.commit()


def keep_masks(client: TestClient, storage: Path, experiment_id: str) -> None:
    """Hand-made masks (one layer of 8) for the density-0.1 random-growth trials: seed 0
    starts from {0,1,2,3}, seed 1 from {0,1,4,5}; both end at magnitude {0,1,2,4}, set
    {0,1,5,6}, snip {4,5,6,7}."""
    finals = {"magnitude": [0, 1, 2, 4], "set": [0, 1, 5, 6], "snip": [4, 5, 6, 7]}
    initials = {0: [0, 1, 2, 3], 1: [0, 1, 4, 5]}

    def masks(on: list[int]) -> dict[str, torch.Tensor]:
        mask = torch.zeros(8, dtype=torch.bool)
        mask[on] = True
        return {"fc.weight": mask}

    for trial, spec in low_density_random_trials(client, experiment_id):
        directory = trial_masks_dir(experiment_masks_dir(storage, experiment_id), trial.index)
        save_masks(masks(initials[spec.seed]), directory / INITIAL)
        save_masks(masks(finals[spec.sparsity.criterion]), directory / FINAL)


def test_end_mask_structure_from_the_kept_masks(client: TestClient, tmp_path: Path) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id)
    keep_masks(client, tmp_path, experiment_id)
    analysis = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH).json()
    (entry,) = analysis["structure"]  # only one setting has masks
    assert entry["setting"] == {"sparsity.density": 0.1, "sparsity.growth": "random"}
    jaccard = entry["jaccard"]
    assert jaccard["names"] == ["magnitude", "set", "snip", "init"] and jaccard["n_seeds"] == 2
    mean = dict(zip(jaccard["names"], jaccard["mean"], strict=True))
    assert math.isclose(mean["magnitude"][1], 2 / 6)  # {0,1} of {0,1,2,4,5,6}
    assert math.isclose(mean["magnitude"][2], 1 / 7)  # {4} of {0,1,2,4,5,6,7}
    assert math.isclose(mean["set"][2], 2 / 6)
    assert math.isclose(mean["magnitude"][3], (3 / 5 + 3 / 5) / 2)  # vs the initial masks
    assert math.isclose(mean["snip"][3], (0 / 8 + 2 / 6) / 2)
    assert math.isclose(entry["j_init"], 2 / 6)  # {0,1,2,3} vs {0,1,4,5}
    # Figure 19: no weight is in all three end masks; only weight 3 is in none of them
    shares = entry["consensus"]
    assert shares["kept_by_all"] == {"mean": 0.0, "std": 0.0}
    assert shares["removed_by_all"] == {"mean": 0.25, "std": 0.0}
    names = {f["name"] for f in analysis["figures"]}
    assert "jaccard_end_masks" in names
    png = client.get(f"/experiments/{experiment_id}/figures/jaccard_end_masks.png", headers=AUTH)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_a_running_study_is_analysed_partially(client: TestClient) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id, keep_running=3)
    analysis = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH).json()
    assert analysis["partial"] is True and analysis["n_finished"] == 30 - 3
    ranking = analysis["rankings"]["all"]
    # the unfinished trials leave their groups incomplete: ranked without them, and named
    assert ranking["dropped_groups"] and ranking["n_groups"] + len(ranking["dropped_groups"]) == 4


class _Images(HTMLParser):
    """The ``<img>`` tags of a page: alt text and decoded PNG data."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            found = dict(attrs)
            prefix, _, data = (found["src"] or "").partition(",")
            assert prefix == "data:image/png;base64"
            self.images[str(found["alt"])] = base64.b64decode(data)


def api_client(client: TestClient) -> ApiClient:
    """The CLI's REST client, over the in-process app."""
    api = ApiClient("http://testserver", TOKEN)
    client.headers.update(AUTH)
    api.http = client
    return api


def test_the_report_is_one_file_with_every_figure(client: TestClient, tmp_path: Path) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id)
    path = write_report(api_client(client), experiment_id, tmp_path / "out")
    page = path.read_text()
    parser = _Images()
    parser.feed(page)
    names = {f["name"] for f in client.get(f"/experiments/{experiment_id}/figures").json()}
    assert set(parser.images) == names and len(names) == 4
    assert all(data.startswith(b"\x89PNG") for data in parser.images.values())
    assert "Friedman" in page and "magnitude" in page  # rankings
    assert "0.8950 ± 0.0071" in page  # magnitude at density 0.1: seeds 0.90 and 0.89
    assert "small-mlp" in page  # the shared spec


def test_a_report_before_anything_finished_says_so(client: TestClient, tmp_path: Path) -> None:
    experiment_id = submit(client)
    page = write_report(api_client(client), experiment_id, tmp_path).read_text()
    assert "nothing to rank before a trial has succeeded" in page
    assert "no trial has succeeded yet" in page and "no figures for this study" in page
    client.post(f"/experiments/{experiment_id}/cancel", headers=AUTH)
    page = write_report(api_client(client), experiment_id, tmp_path).read_text()
    assert "no trial succeeded<" in page


def test_first_update_removal_sets_from_the_runs_metrics(client: TestClient) -> None:
    """Runs with analysis.removal_sets report, per other criterion, the Jaccard index of the
    sets pruned at their first update; the study averages them over seeds (Figure 6a)."""
    experiment_id = submit(client)
    finish(client, experiment_id)
    for trial, spec in low_density_random_trials(client, experiment_id):
        criterion = spec.sparsity.criterion
        # magnitude vs set: 0.8 (seed 0) and 0.6 (seed 1); anything else 0.1
        row = {c: 1.0 if c == criterion else 0.1 for c in ("magnitude", "set", "snip")}
        if criterion in ("magnitude", "set"):
            row["set" if criterion == "magnitude" else "magnitude"] = 0.8 - 0.2 * spec.seed
        metrics = json.loads(trial.metrics_json or "{}")
        metrics |= {f"removal_jaccard_first.{c}": v for c, v in row.items()}
        trial.metrics_json = json.dumps(metrics)
    analysis = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH).json()
    (entry,) = analysis["removal"]
    assert entry["setting"] == {"sparsity.density": 0.1, "sparsity.growth": "random"}
    assert sorted(entry["rows"]) == ["magnitude", "set", "snip"] and entry["n_seeds"] == 2
    mean = {
        r: dict(zip(entry["columns"], m, strict=True))
        for r, m in zip(entry["rows"], entry["mean"], strict=True)
    }
    std = {
        r: dict(zip(entry["columns"], m, strict=True))
        for r, m in zip(entry["rows"], entry["std"], strict=True)
    }
    assert math.isclose(mean["magnitude"]["set"], 0.7) and math.isclose(
        mean["set"]["magnitude"], 0.7
    )
    assert math.isclose(std["magnitude"]["set"], math.sqrt(0.02))  # sample std of 0.8, 0.6
    assert mean["snip"]["snip"] == 1.0 and math.isclose(mean["snip"]["magnitude"], 0.1)
    names = {f["name"] for f in analysis["figures"]}
    assert "jaccard_first_update" in names
    png = client.get(f"/experiments/{experiment_id}/figures/jaccard_first_update.png", headers=AUTH)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


# -- the analysis itself, from hand-made finished trials -------------------------------------


def run(criterion: str | None, seed: int, density: float = 0.1, mode: str = "dst") -> RunSpec:
    sparsity: dict[str, Any] = {"mode": mode, "density": density}
    if mode == "dst":
        sparsity |= {"criterion": criterion, "growth": "random", "update_period": 10}
    return RunSpec.model_validate(
        {"model": "small-mlp", "dataset": "digits", "seed": seed, "sparsity": sparsity}
    )


def history(*rows: dict[str, float]) -> list[dict[str, float]]:
    """Per-epoch metrics: each row's values over defaults for the curve metrics."""
    base = {"val_acc": 0.5, "train_loss": 1.0, "loss_gap": 0.1}
    return [base | {"epoch": e + 1, "step": 10.0 * (e + 1)} | r for e, r in enumerate(rows)]


def test_learning_curves_average_seeds_and_set_each_baseline_beside_its_setting() -> None:
    t = FinishedTrial
    finished = [
        t(run("magnitude", 0), {"test_acc": 0.8}, 0, history({"val_acc": 0.6}, {"val_acc": 0.7})),
        t(run("magnitude", 1), {"test_acc": 0.9}, 1, history({"val_acc": 0.8}, {"val_acc": 0.9})),
        t(run("magnitude", 0, 0.5), {"test_acc": 0.9}, 2, history({}, {})),
        t(run(None, 0, 0.1, "static"), {"test_acc": 0.5}, 3, history({"loss_gap": 0.3}, {})),
        t(run(None, 0, 0.5, "static"), {"test_acc": 0.6}, 4, history({"loss_gap": 0.7}, {})),
        t(run(None, 0, 1.0, "dense"), {"test_acc": 0.95}, 5, history({}, {}, {})),
    ]
    analysis = analyze([t.spec for t in finished], finished, partial=False)
    curves = {json.dumps(c["setting"]): c["lines"] for c in analysis.curves}
    low = curves[json.dumps({"sparsity.density": 0.1})]
    assert set(low) == {"magnitude", "static", "dense"}  # the static run of its density only
    magnitude = low["magnitude"]
    assert magnitude["epoch"] == [1, 2] and magnitude["n_seeds"] == 2
    assert magnitude["val_acc"]["mean"] == pytest.approx([0.7, 0.8])
    assert magnitude["val_acc"]["std"] == pytest.approx([math.sqrt(0.02)] * 2)
    assert magnitude["test_acc"] == pytest.approx(0.85)
    assert magnitude["test_acc_std"] == pytest.approx(math.sqrt(0.005))  # Figure 4's error bar
    assert low["static"]["test_acc_std"] is None  # one seed
    assert (
        low["static"]["loss_gap"]["mean"] == [0.3, 0.1] and low["static"]["loss_gap"]["std"] is None
    )
    assert low["dense"]["epoch"] == [1, 2, 3]
    high = curves[json.dumps({"sparsity.density": 0.5})]
    assert high["static"]["loss_gap"]["mean"] == [0.7, 0.1]
    names = figure_names(analysis)
    assert {"learning_curves_density-0.1", "loss_gap_density-0.5"} <= set(names)
    for name in ("learning_curves_density-0.1", "loss_gap_density-0.1"):
        assert render(build_figure(analysis, name), "png").startswith(b"\x89PNG")


def test_removal_jaccard_over_time_skips_epochs_before_the_first_update() -> None:
    def trial(criterion: str, seed: int, values: list[float | None]) -> FinishedTrial:
        other = "set" if criterion == "magnitude" else "magnitude"
        rows = [{} if v is None else {f"removal_jaccard.{other}": v} for v in values]
        metrics = {"test_acc": 0.5, f"removal_jaccard.{other}": values[-1] or 0.0}
        return FinishedTrial(run(criterion, seed), metrics, seed, history(*rows))

    finished = [
        trial("magnitude", 0, [None, 0.4, 0.6]),
        trial("magnitude", 1, [None, 0.6, 0.8]),
        trial("set", 0, [0.2, 0.3, 0.4]),
    ]
    analysis = analyze([t.spec for t in finished], finished, partial=False)
    (entry,) = analysis.over_time
    line = entry["lines"]["magnitude"]["set"]
    assert line["step"] == [20.0, 30.0] and line["mean"] == pytest.approx([0.5, 0.7])
    assert line["std"] == pytest.approx([math.sqrt(0.02)] * 2) and line["n_seeds"] == 2
    assert entry["lines"]["set"]["magnitude"]["std"] is None
    assert "j_r" not in entry  # the first update's J_r does not hold for later updates
    assert "jaccard_over_time" in figure_names(analysis)
    assert render(build_figure(analysis, "jaccard_over_time"), "svg").lstrip().startswith(b"<?xml")


def test_an_update_that_removes_nothing_is_a_gap_in_figure_18_not_a_point() -> None:
    """Epoch 3's update removes nothing in seed 0 (its index is NaN): the mean there is seed
    1's 0.8 with no std; epoch 4's removes nothing in either seed: no value (None), a gap, and
    the analysis stays strict JSON. Figure 18 draws it as a gap, without a numpy warning."""
    nan = math.nan

    def trial(seed: int, values: list[float]) -> FinishedTrial:
        rows = [{"removal_jaccard.set": v} for v in values]
        metrics = {"test_acc": 0.5, "removal_jaccard.set": values[-1]}
        return FinishedTrial(run("magnitude", seed), metrics, seed, history(*rows))

    finished = [trial(0, [0.4, 0.6, nan, nan]), trial(1, [0.6, 0.8, 0.8, nan])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis = analyze([t.spec for t in finished], finished, partial=False)
        (ax,) = build_figure(analysis, "jaccard_over_time").axes
    (entry,) = analysis.over_time
    line = entry["lines"]["magnitude"]["set"]
    assert line["mean"] == [pytest.approx(0.5), pytest.approx(0.7), pytest.approx(0.8), None]
    assert line["std"] == [pytest.approx(math.sqrt(0.02))] * 2 + [None, None]
    json.dumps(analysis.to_dict(), allow_nan=False)
    drawn = list(ax.get_lines()[0].get_ydata())
    assert drawn[:3] == pytest.approx([0.5, 0.7, 0.8]) and math.isnan(drawn[3])


def test_figure_18_draws_no_j_r_line(tmp_path: Path) -> None:
    """The setting has J_r (its first update's, from two seeds' initial masks), but Figure 18
    spans every update, whose prune fractions decay: no flat J_r line across them."""
    finished = []
    for seed in (0, 1):
        metrics = {"test_acc": 0.5, "step": 40.0, "removal_jaccard.set": 0.3}
        rows = history({"removal_jaccard.set": 0.2}, {"removal_jaccard.set": 0.3})
        finished.append(FinishedTrial(run("magnitude", seed), metrics, seed, rows))
        mask = torch.zeros(8, dtype=torch.bool)
        mask[[0, 1, 2, 3]] = True
        save_masks({"fc.weight": mask}, trial_masks_dir(tmp_path, seed) / INITIAL)
    analysis = analyze([t.spec for t in finished], finished, partial=False, mask_dir=tmp_path)
    (ax,) = build_figure(analysis, "jaccard_over_time").axes
    assert [line.get_label() for line in ax.get_lines()] == ["set"]


def test_first_update_layers_empty_in_one_seed_average_over_the_others(tmp_path: Path) -> None:
    """Appendix K with a layer whose sets are both empty in seed 0 (NaN there, and so the
    run's own layer mean): layer A 0.8 and 0.6, layer B seed 1's 0.8 alone. Mean (0.7 + 0.8)
    / 2 = 0.75; std: A's √0.02 (B has one seed)."""
    finished = []
    for seed, (a, b) in enumerate([(0.8, math.nan), (0.6, 0.8)]):
        metrics = {"test_acc": 0.5, "removal_jaccard_first.set": (a + b) / 2}
        finished.append(FinishedTrial(run("magnitude", seed), metrics, seed))
        kept = trial_masks_dir(tmp_path, seed) / FIRST_REMOVAL
        kept.parent.mkdir(parents=True)
        kept.write_text(json.dumps({"set": {"A": a, "B": b}}))  # NaN as the driver writes it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis = analyze([t.spec for t in finished], finished, partial=False, mask_dir=tmp_path)
    (entry,) = analysis.removal
    assert entry["mean"] == [[None, pytest.approx(0.75)]]
    assert entry["std"] == [[None, pytest.approx(math.sqrt(0.02))]]


def test_a_density_split_ranks_every_criterion_of_the_study() -> None:
    """snip's runs at density 0.1 all failed: the ≤ 0.2 split has no group with every
    criterion, so it has no ranking (and says snip has no result there) rather than ranking
    magnitude and set as if the study had no snip; "all" drops and lists density 0.1."""
    accuracy = {"magnitude": 0.9, "set": 0.89, "snip": 0.8}
    finished = [
        FinishedTrial(run(c, seed, density), {"test_acc": accuracy[c]}, -1)
        for c in accuracy
        for density in (0.1, 0.5)
        for seed in (0, 1)
        if not (c == "snip" and density == 0.1)
    ]
    analysis = analyze([t.spec for t in finished], finished, partial=False)
    assert "low" not in analysis.rankings and "snip: no result here" in analysis.skipped["low"]
    every = analysis.rankings["all"]
    assert every["dropped_groups"] == [{"sparsity.density": 0.1}]
    assert every["average_ranks"] == {"magnitude": 1.0, "set": 2.0, "snip": 3.0}


def test_the_summary_logs_no_nan_metric() -> None:
    """A criterion whose runs have no finite test accuracy gets no ``mean_test_acc`` metric
    (MLflow would store NaN) and no best-criterion tag."""
    from service.analysis import summary

    trials = [
        FinishedTrial(run("magnitude", 0), {"test_acc": 0.8}),
        FinishedTrial(run("snip", 0), {"test_acc": math.nan}),
    ]
    metrics, tags = summary(analyze([t.spec for t in trials], trials, partial=False))
    assert metrics == {"mean_test_acc.magnitude": pytest.approx(0.8)}
    assert tags == {"best_criterion.density_0.1": "magnitude"}


def test_first_update_fraction_follows_the_cosine_schedule() -> None:
    # ρ_t = ρ/2 (1 + cos(π t / T)) at t = Δt = 10, T = 40 steps, ρ = 0.5
    assert first_update_fraction(run("magnitude", 0), 40) == pytest.approx(
        0.25 * (1 + math.cos(math.pi / 4))
    )


def test_j_r_is_the_overlap_of_random_removal_sets_from_each_seeds_initial_mask(
    tmp_path: Path,
) -> None:
    """Disjoint initial masks can only give disjoint random removal sets: J_r = 0; the same
    initial mask with ρ_t = ρ removes 2 of 4 twice: J_r of two random 2-subsets of 4."""
    initials = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    finished = []
    for seed, on in initials.items():
        for index, criterion in enumerate(("magnitude", "set")):
            spec = run(criterion, seed)
            metrics = {"test_acc": 0.5, "step": 40.0, "removal_jaccard_first.set": 0.5}
            finished.append(FinishedTrial(spec, metrics, 2 * seed + index))
            mask = torch.zeros(8, dtype=torch.bool)
            mask[on] = True
            save_masks({"fc.weight": mask}, trial_masks_dir(tmp_path, 2 * seed + index) / INITIAL)
    analysis = analyze([t.spec for t in finished], finished, partial=False, mask_dir=tmp_path)
    (entry,) = analysis.removal
    assert entry["j_r"] == 0.0


def test_figure_names_carry_the_setting_only_when_a_study_has_several() -> None:
    assert setting_slug({"sparsity.growth": "gradient", "sparsity.density": 0.1}) == (
        "growth-gradient_density-0.1"
    )
    one = [FinishedTrial(run("magnitude", 0), {"test_acc": 0.8}, 0, history({}))]
    assert "learning_curves" in figure_names(analyze([one[0].spec], one, partial=False))


def test_a_trials_own_figures() -> None:
    spec = run("magnitude", 0)
    rows = history({}, {"removal_jaccard.set": 0.3, "removal_jaccard.snip": 0.1})
    figures = trial_figures(spec, rows)
    assert set(figures) == {"learning_curves", "jaccard_over_time"}
    (ax,) = figures["jaccard_over_time"]().axes
    assert [line.get_label() for line in ax.get_lines()] == ["set", "snip"]
    assert set(trial_figures(spec, history({}))) == {"learning_curves"}
    assert trial_figures(spec, []) == {}


def test_a_studys_analysis_is_computed_once_until_a_trial_changes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[str] = []
    original = crud.study_analysis

    def counted(session: Session, experiment_id: str, mask_dir: Path | None = None) -> Any:
        computed.append(experiment_id)
        return original(session, experiment_id, mask_dir)

    monkeypatch.setattr(crud, "study_analysis", counted)
    experiment_id = submit(client)
    finish(client, experiment_id, keep_running=1)
    for path in ("analysis", "figures", "figures/accuracy_vs_density.png", "analysis"):
        assert client.get(f"/experiments/{experiment_id}/{path}", headers=AUTH).status_code == 200
    assert computed == [experiment_id]
    finish(client, experiment_id)  # the last trial finishes
    analysis = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH).json()
    assert computed == [experiment_id] * 2 and analysis["partial"] is False


def test_a_trials_history_over_rest(client: TestClient) -> None:
    experiment_id = submit(client)
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        for epoch in (2, 1):
            crud.record_epoch(session, experiment_id, 3, {"epoch": epoch, "val_acc": epoch / 10})
        session.commit()
    base = f"/experiments/{experiment_id}/trials"
    answer = client.get(f"{base}/3/history", headers=AUTH)
    assert answer.status_code == 200
    assert answer.json() == [{"epoch": 1, "val_acc": 0.1}, {"epoch": 2, "val_acc": 0.2}]
    assert client.get(f"{base}/0/history", headers=AUTH).json() == []  # no epoch yet
    assert client.get(f"{base}/999/history", headers=AUTH).status_code == 404
    assert client.get(f"{base}/-1/history", headers=AUTH).status_code == 422
    assert client.get("/experiments/nope/trials/0/history", headers=AUTH).status_code == 404
    assert api_client(client).history(experiment_id, 3)[1]["val_acc"] == 0.2


def test_report_figures_keep_their_size_in_a_palette(client: TestClient) -> None:
    import io

    from PIL import Image

    from service.report import compact_png

    experiment_id = submit(client)
    finish(client, experiment_id)
    png = api_client(client).figure(experiment_id, "accuracy_vs_density.png", 80)
    small = compact_png(png)
    with Image.open(io.BytesIO(png)) as before, Image.open(io.BytesIO(small)) as after:
        assert after.mode == "P" and after.size == before.size
    assert len(small) < len(png) / 2


def test_itop_vs_update_period_from_the_final_itop_of_a_period_sweep() -> None:
    def trial(criterion: str, period: int, seed: int, itop: float) -> FinishedTrial:
        spec = run(criterion, seed)
        spec = spec.model_copy(
            update={"sparsity": spec.sparsity.model_copy(update={"update_period": period})}
        )
        return FinishedTrial(spec, {"test_acc": 0.5, "itop": itop}, -1)

    finished = [
        trial("magnitude", 25, 0, 0.6),
        trial("magnitude", 25, 1, 0.8),
        trial("magnitude", 100, 0, 0.3),
        trial("snip", 25, 0, 0.9),
        trial("snip", 100, 0, 0.5),
    ]
    analysis = analyze([t.spec for t in finished], finished, partial=False)
    rows = {
        (r["config"]["sparsity.criterion"], r["config"]["sparsity.update_period"]): r
        for r in analysis.itop
    }
    assert rows[("magnitude", 25)]["itop_mean"] == pytest.approx(0.7)
    assert rows[("magnitude", 25)]["itop_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[("snip", 100)]["itop_std"] is None and rows[("snip", 100)]["n"] == 1
    names = figure_names(analysis)
    assert {"accuracy_vs_update_period", "itop_vs_update_period"} <= set(names)
    (ax,) = build_figure(analysis, "itop_vs_update_period").axes
    assert [line.get_label() for line in ax.get_lines()] == ["magnitude", "snip"]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([0.7, 0.3])


def test_the_cache_computes_a_study_once_for_requests_that_arrive_together() -> None:
    import threading

    from service.analysis import AnalysisCache, StudyAnalysis

    cache = AnalysisCache(size=2)
    calls: list[str] = []
    release, started = threading.Event(), threading.Event()

    def compute(name: str) -> StudyAnalysis:
        calls.append(name)
        if name == "a" and len(calls) == 1:
            started.set()
            assert release.wait(5)  # the first computation of a is slow
        return StudyAnalysis(False, 0, [], [])

    got: list[StudyAnalysis] = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get("a", 1, lambda: compute("a"))))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    assert started.wait(5)
    assert cache.get("b", 1, lambda: compute("b")) is not None  # another study: no waiting
    assert not release.is_set() and calls == ["a", "b"]  # a is still being computed
    release.set()
    for thread in threads:
        thread.join(5)
    assert calls.count("a") == 1 and len({id(a) for a in got}) == 1
    cache.get("a", 2, lambda: compute("a"))  # a new version
    cache.get("c", 1, lambda: compute("c"))  # evicts the least recently used: b
    cache.get("b", 1, lambda: compute("b"))
    assert calls == ["a", "b", "a", "c", "b"]


def test_first_update_std_is_taken_per_layer_when_the_runs_kept_their_layers(
    tmp_path: Path,
) -> None:
    """Appendix K (Figure 20): layer A gives 0.8 and 0.6 over two seeds, layer B 0.6 and 0.8.
    Per layer the std is √0.02 in both; the layer means (0.7 and 0.7) would give 0."""
    finished = []
    for seed, (a, b) in enumerate([(0.8, 0.6), (0.6, 0.8)]):
        metrics = {"test_acc": 0.5, "removal_jaccard_first.set": (a + b) / 2}
        finished.append(FinishedTrial(run("magnitude", seed), metrics, seed))
        kept = trial_masks_dir(tmp_path, seed) / FIRST_REMOVAL
        kept.parent.mkdir(parents=True)
        kept.write_text(json.dumps({"set": {"A": a, "B": b}}))
    analysis = analyze([t.spec for t in finished], finished, partial=False, mask_dir=tmp_path)
    (entry,) = analysis.removal
    assert entry["rows"] == ["magnitude"] and entry["columns"] == ["magnitude", "set"]
    assert entry["std_per_layer"] is True
    assert entry["mean"] == [[None, pytest.approx(0.7)]]
    assert entry["std"] == [[None, pytest.approx(math.sqrt(0.02))]]
    (trial_masks_dir(tmp_path, 1) / FIRST_REMOVAL).unlink()  # a run without its layers
    analysis = analyze([t.spec for t in finished], finished, partial=False, mask_dir=tmp_path)
    (entry,) = analysis.removal
    assert entry["std_per_layer"] is False and entry["std"] == [[None, pytest.approx(0.0)]]


def two_setting_analysis() -> Any:
    trials = [
        FinishedTrial(run(c, seed, density), {"test_acc": 0.5 + 0.1 * seed}, seed, history({}, {}))
        for c in ("magnitude", "set")
        for seed in (0, 1)
        for density in (0.1, 0.5)
    ]
    return analyze([t.spec for t in trials], trials, partial=False)


def test_figures_are_written_by_child_processes_or_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every figure as PNG and SVG, the same whether two processes draw them or this one (when
    no child process can start)."""
    from concurrent.futures import ProcessPoolExecutor

    from service.figures import write_figures

    analysis = two_setting_analysis()
    names = figure_names(analysis)
    assert len(names) >= 4
    (tmp_path / "children").mkdir()
    with caplog.at_level("WARNING"):
        write_figures(analysis, tmp_path / "children")
    assert "drawing the figures in this process" not in caplog.text  # the children drew them
    files = {p.name for p in (tmp_path / "children").iterdir()}
    assert files == {f"{n}.{k}" for n in names for k in ("png", "svg")}

    def no_processes(*args: object, **kwargs: object) -> ProcessPoolExecutor:
        raise OSError("no more processes")

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", no_processes)
    (tmp_path / "here").mkdir()
    with caplog.at_level("WARNING"):
        write_figures(analysis, tmp_path / "here")
    assert {p.name for p in (tmp_path / "here").iterdir()} == files
    assert "drawing the figures in this process" in caplog.text


def test_the_best_criterion_tags_name_each_settings_own_best() -> None:
    """lr 0.01: magnitude 0.90, snip 0.80 at density 0.1; 0.85, 0.95 at 0.5. lr 0.1: magnitude
    0.30, snip 0.40 at 0.1; 0.45, 0.35 at 0.5. Across both learning rates the best run at
    density 0.1 is lr 0.01's magnitude, yet snip is lr 0.1's best there. The means over every
    configuration: magnitude (0.90 + 0.85 + 0.30 + 0.45) / 4 = 0.625, snip 0.625."""
    from service.analysis import summary

    accuracy = {
        (0.01, "magnitude", 0.1): 0.90,
        (0.01, "snip", 0.1): 0.80,
        (0.01, "magnitude", 0.5): 0.85,
        (0.01, "snip", 0.5): 0.95,
        (0.1, "magnitude", 0.1): 0.30,
        (0.1, "snip", 0.1): 0.40,
        (0.1, "magnitude", 0.5): 0.45,
        (0.1, "snip", 0.5): 0.35,
    }
    trials = []
    for index, (lr, criterion, density) in enumerate(accuracy):
        spec = run(criterion, 0, density)
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"lr": lr})})
        trials.append(FinishedTrial(spec, {"test_acc": accuracy[lr, criterion, density]}, index))
    metrics, tags = summary(analyze([t.spec for t in trials], trials, partial=False))
    assert metrics == {
        "mean_test_acc.magnitude": pytest.approx(0.625),
        "mean_test_acc.snip": pytest.approx(0.625),
    }
    assert tags == {
        "best_criterion.density_0.1_lr-0.01": "magnitude",
        "best_criterion.density_0.5_lr-0.01": "snip",
        "best_criterion.density_0.1_lr-0.1": "snip",
        "best_criterion.density_0.5_lr-0.1": "magnitude",
    }
    one = [t for t in trials if t.spec.training.lr == 0.1]  # one setting: the names stay
    _, tags = summary(analyze([t.spec for t in one], one, partial=False))
    assert tags == {"best_criterion.density_0.1": "snip", "best_criterion.density_0.5": "magnitude"}


def test_a_study_of_one_criterion_still_reports_it() -> None:
    """The criterion is not varied (so not in the results' configs): its mean and its tag
    at each density still come out, under the criterion the runs used."""
    from service.analysis import summary

    trials = [
        FinishedTrial(run("snip", seed, density), {"test_acc": acc})
        for seed, density, acc in ((0, 0.1, 0.6), (1, 0.1, 0.8), (0, 0.5, 0.9), (1, 0.5, 0.9))
    ]
    metrics, tags = summary(analyze([t.spec for t in trials], trials, partial=False))
    assert metrics == {"mean_test_acc.snip": pytest.approx((0.7 + 0.9) / 2)}
    assert tags == {"best_criterion.density_0.1": "snip", "best_criterion.density_0.5": "snip"}


def test_a_best_criterion_tag_too_long_for_mlflow_is_named_by_its_settings_hash() -> None:
    """MLflow takes tag names of at most 250 characters: a data root of 300 gives
    ``best_criterion.density_<d>_<hash>`` (the setting's, as a figure's name would have)."""
    from service.analysis import setting_hash, summary

    long = "/d/" + "x" * 300
    trials = []
    for root in (long, "/d/y"):
        for criterion in ("magnitude", "snip"):
            for density in (0.1, 0.5):
                spec = run(criterion, 0, density)
                data = spec.data.model_copy(update={"root": root})
                score = {"test_acc": 0.9 if criterion == "snip" else 0.8}
                trials.append(FinishedTrial(spec.model_copy(update={"data": data}), score))
    _, tags = summary(analyze([t.spec for t in trials], trials, partial=False))
    hashed = setting_hash({"data.root": long})
    assert tags == {
        f"best_criterion.density_0.1_{hashed}": "snip",
        f"best_criterion.density_0.5_{hashed}": "snip",
        "best_criterion.density_0.1_root--d-y": "snip",
        "best_criterion.density_0.5_root--d-y": "snip",
    }


# -- what the criteria are ranked by ------------------------------------------------------------


def test_a_study_ranks_by_the_metric_its_spec_names(client: TestClient, tmp_path: Path) -> None:
    """``ranking.metric: test_acc_at_best_val``: the best-validation epoch's test accuracy
    reverses the last epoch's order here (snip 0.9, set 0.8, magnitude 0.7 at every density and
    growth), so every split ranks snip first; the analysis, the CSV and the report say by what."""
    from service.analysis import rankings_csv

    spec = study() | {"ranking": {"metric": "test_acc_at_best_val"}}
    answer = client.post("/experiments", json=spec, headers=AUTH)
    assert answer.status_code == 201, answer.text
    experiment_id = answer.json()["id"]
    stored = client.get(f"/experiments/{experiment_id}/spec", headers=AUTH).json()
    assert stored["ranking"] == {"metric": "test_acc_at_best_val"}
    finish(client, experiment_id)
    at_best_val = {"snip": 0.9, "set": 0.8, "magnitude": 0.7}
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        for trial in crud.list_trials(session, experiment_id):
            criterion = RunSpec.model_validate_json(trial.spec_json).sparsity.criterion
            metrics = json.loads(trial.metrics_json or "{}")
            metrics["test_acc_at_best_val"] = at_best_val.get(criterion, 0.5)
            trial.metrics_json = json.dumps(metrics)
        session.commit()
    analysis = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH).json()
    for split in ("all", "low", "high"):
        ranking = analysis["rankings"][split]
        assert ranking["metric"] == "test_acc_at_best_val"
        assert ranking["average_ranks"] == {"snip": 1.0, "set": 2.0, "magnitude": 3.0}
    with Session(engine) as session:
        csv = rankings_csv(crud.study_analysis(session, experiment_id)).splitlines()
    assert csv[0].endswith(",metric") and csv[1].startswith("all,snip,1.0000,4,")
    assert csv[1].endswith(",test_acc_at_best_val")
    page = write_report(api_client(client), experiment_id, tmp_path / "out").read_text()
    assert "ranked by the mean over seeds of test_acc_at_best_val" in page


def test_a_study_ranks_by_the_last_epochs_test_accuracy_unless_told(client: TestClient) -> None:
    experiment_id = submit(client)
    finish(client, experiment_id)
    analysis = client.get(f"/experiments/{experiment_id}/analysis", headers=AUTH).json()
    assert {r["metric"] for r in analysis["rankings"].values()} == {"test_acc"}


def test_an_unknown_ranking_metric_is_refused_naming_the_choices(client: TestClient) -> None:
    answer = client.post(
        "/experiments", json=study() | {"ranking": {"metric": "test_loss"}}, headers=AUTH
    )
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["loc"][-2:] == ["ranking", "metric"]
    assert "'test_acc'" in error["msg"] and "'test_acc_at_best_val'" in error["msg"]
    assert client.get("/experiments", headers=AUTH).json()["total"] == 0


def test_the_summary_names_the_best_criterion_by_the_ranking_metric() -> None:
    """Ranked by the best-validation epoch's accuracy, snip (0.9 there, 0.6 at the last epoch)
    is the best criterion; both means are logged, the headline's and the ranking's."""
    from service.analysis import summary

    metrics_of = {
        "magnitude": {"test_acc": 0.8, "test_acc_at_best_val": 0.85},
        "snip": {"test_acc": 0.6, "test_acc_at_best_val": 0.9},
    }
    trials = [FinishedTrial(run(c, 0), m) for c, m in metrics_of.items()]
    specs = [t.spec for t in trials]
    metrics, tags = summary(analyze(specs, trials, False, metric="test_acc_at_best_val"))
    assert metrics == {
        "mean_test_acc.magnitude": pytest.approx(0.8),
        "mean_test_acc.snip": pytest.approx(0.6),
        "mean_test_acc_at_best_val.magnitude": pytest.approx(0.85),
        "mean_test_acc_at_best_val.snip": pytest.approx(0.9),
    }
    assert tags == {"best_criterion.density_0.1": "snip"}
    _, tags = summary(analyze(specs, trials, partial=False))
    assert tags == {"best_criterion.density_0.1": "magnitude"}


def test_a_diverged_seed_leaves_its_metric_without_a_value(client: TestClient) -> None:
    """A trial whose loss diverged (NaN, or infinite) is a finished trial like any other: the
    results, the analysis, the figures and the report still answer; a row's statistic over
    such a seed is not a number, which strict JSON carries as null, and the rankings rest on
    the accuracies, which stay numbers."""
    experiment_id = submit(client)
    finish(client, experiment_id)
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        trials = crud.list_trials(session, experiment_id)
        specs = [RunSpec.model_validate_json(t.spec_json) for t in trials]
        seed0 = [
            t for t, s in zip(trials, specs, strict=True) if s.sparsity.mode == "dst" and not s.seed
        ]
        for trial, loss in zip(seed0[:2], (math.nan, math.inf), strict=True):
            trial.metrics_json = json.dumps(json.loads(trial.metrics_json) | {"test_loss": loss})
        session.commit()
    path = f"/experiments/{experiment_id}"
    for suffix in ("/trials", "/results", "/analysis", "/figures"):
        answer = client.get(path + suffix, headers=AUTH)
        assert answer.status_code == 200, (suffix, answer.text)
    rows = client.get(f"{path}/results", headers=AUTH).json()["rows"]
    losses = [(r["test_loss_mean"], r["test_loss_std"]) for r in rows]
    assert losses.count((None, None)) == 2  # the two configurations with a diverged seed
    assert all(r["test_acc_mean"] is not None for r in rows)
    trials = client.get(f"{path}/trials", headers=AUTH).json()
    assert sorted(str(t["metrics"]["test_loss"]) for t in trials)[-2:] == ["None", "None"]
    analysis = client.get(f"{path}/analysis", headers=AUTH).json()
    assert analysis["rankings"]["all"]["average_ranks"]["magnitude"] == 1.5
