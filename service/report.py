"""A study's report as one self-contained HTML file (runs on the user's machine, via REST).

``dst report ID --out DIR`` and the end of ``dst demo`` write ``DIR/report.html``: the study's
status and MLflow links, what its trials have in common (the spec) and what they vary, the
results table, the criteria rankings with Friedman's test and the critical distance, and
every figure the API draws for it, inlined as PNG, so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from service.client import ApiError
from service.figures import KINDS, SPLIT_TITLES, kind_of, setting_title
from service.results import format_cell, format_stat

FETCHERS = 4  # figures requested at once
REPORT_DPI = 80  # enough to read on a screen; a study's many figures stay a few MB
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1rem 0 2rem; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; }
"""


class ReportSource(Protocol):
    """What the report reads (the REST client)."""

    def experiment(self, experiment_id: str) -> dict[str, Any]: ...
    def trials(self, experiment_id: str) -> list[dict[str, Any]]: ...
    def results(self, experiment_id: str) -> dict[str, Any]: ...
    def analysis(self, experiment_id: str) -> dict[str, Any]: ...
    def figure(self, experiment_id: str, filename: str, dpi: int | None = None) -> bytes: ...


def write_report(
    source: ReportSource, experiment_id: str, out: Path, progress: bool = False
) -> Path:
    """Fetch everything about ``experiment_id`` and write ``out/report.html`` (with
    ``progress``, a progress bar over the figures, fetched a few at a time). ``out`` is made
    first, so one that cannot be written fails (``OSError``) before anything is fetched."""
    out.mkdir(parents=True, exist_ok=True)
    experiment = source.experiment(experiment_id)
    trials = source.trials(experiment_id)
    results = source.results(experiment_id)
    try:
        analysis: dict[str, Any] | None = source.analysis(experiment_id)
    except ApiError as error:
        if error.status != 409:  # 409: no trial has succeeded
            raise
        analysis = None
    names = [f["name"] for f in (analysis or {}).get("figures", [])]
    images = dict(zip(names, _fetch_figures(source, experiment_id, names, progress), strict=True))
    path = out / "report.html"
    path.write_text(render(experiment, trials, results, analysis, images), encoding="utf-8")
    return path


def _fetch_figures(
    source: ReportSource, experiment_id: str, names: Sequence[str], progress: bool
) -> list[bytes]:
    """The figures as PNG, in order; the API draws them in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def fetch(name: str) -> bytes:
        return compact_png(source.figure(experiment_id, f"{name}.png", REPORT_DPI))

    with ThreadPoolExecutor(FETCHERS) as pool:
        images = pool.map(fetch, names)
        return list(tqdm(images, total=len(names), desc="figures", disable=not progress))


def compact_png(png: bytes) -> bytes:
    """``png`` with a 256-colour palette: a third of the size for line plots with shaded
    bands, so a study's dozens of inlined figures keep the report a few MB."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def render(
    experiment: dict[str, Any],
    trials: Sequence[dict[str, Any]],
    results: dict[str, Any],
    analysis: dict[str, Any] | None,
    images: dict[str, bytes],
) -> str:
    """The report's HTML (pure: everything it shows is passed in)."""
    name = html.escape(str(experiment["name"]))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name}: DST Lab report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{name}</h1>",
        _overview(experiment),
        "<h2>Spec</h2>",
        _spec(trials, results.get("group_by", [])),
        "<h2>Results</h2>",
        _results(results),
        "<h2>Criteria rankings</h2>",
        _rankings(analysis),
        "<h2>Structure</h2>",
        _structure(analysis),
        "<h2>Figures</h2>",
        _figures(images),
        "</body></html>",
    ]
    return "\n".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _link(url: str | None, text: str) -> str:
    if not url:
        return html.escape(text) + " (no link)"
    return f"<a href='{html.escape(url, quote=True)}'>{html.escape(text)}</a>"


def _overview(experiment: dict[str, Any]) -> str:
    mlflow = experiment.get("mlflow") or {}
    counts = ", ".join(f"{k}: {v}" for k, v in experiment.get("trial_counts", {}).items())
    rows = [
        ("experiment", experiment["id"]),
        ("status", experiment["status"]),
        ("trials", f"{experiment['n_trials']} ({counts})"),
        ("created", experiment.get("created_at")),
        ("finished", experiment.get("finished_at")),
    ]
    links = " · ".join(
        [
            _link(mlflow.get("experiment_url"), "MLflow runs"),
            _link(mlflow.get("parent_run_url"), "MLflow parent run"),
        ]
    )
    return _table(["", ""], rows) + f"<p>{links}</p>"


def _spec(trials: Sequence[dict[str, Any]], varied: Sequence[str]) -> str:
    """What every trial shares (the study's spec without its grid) and what varies."""
    if not trials:
        return "<p class='note'>no trials</p>"
    shared = {
        k: v for k, v in trials[0]["params"].items() if all(t["params"].get(k) == v for t in trials)
    }
    note = ", ".join(varied) if varied else "nothing besides the seed"
    return _table(["field", "value"], sorted(shared.items())) + (
        f"<p>Varied across trials: {html.escape(note)}.</p>"
    )


def _results(results: dict[str, Any]) -> str:
    group_by: list[str] = results.get("group_by", [])
    metrics = ("test_acc", "test_acc_at_best_val", "test_loss")
    header = [*(f.rpartition(".")[2] for f in group_by), "n"]
    header += [f"{m} (mean ± std)" for m in metrics]
    rows = [
        [
            *(r["config"].get(f) for f in group_by),
            r["n"],
            *(format_stat(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics),
        ]
        for r in results.get("rows", [])
    ]
    if not rows:
        ended = "no trial succeeded" if results.get("complete") else "no trial has succeeded yet"
        return f"<p class='note'>{ended}</p>"
    note = "" if results.get("complete") else "<p class='note'>partial: trials still run</p>"
    return _table(header, rows) + note


def _rankings(analysis: dict[str, Any] | None) -> str:
    if analysis is None:
        return "<p class='note'>nothing to rank before a trial has succeeded</p>"
    parts = []
    if analysis.get("partial"):
        parts.append("<p class='note'>partial: computed over the trials finished so far</p>")
    for split, ranking in analysis.get("rankings", {}).items():
        friedman = ranking.get("friedman")
        test = (
            f"Friedman χ² = {friedman['statistic']:.3g}, p = {friedman['p_value']:.3g}"
            if friedman
            else f"Friedman test not run: {ranking.get('friedman_skipped')}"
        )
        cd = ranking.get("critical_distance")
        metric = html.escape(ranking.get("metric", "test_acc"))  # (a server before the option)
        parts.append(
            f"<h3>{html.escape(SPLIT_TITLES.get(split, split))}</h3>"
            f"<p>ranked by the mean over seeds of {metric}; "
            f"N = {ranking['n_groups']} groups; {html.escape(test)}; Nemenyi critical "
            f"distance at α = {ranking['alpha']}: {format_cell(cd)}</p>"
        )
        rows = [[c, ranking["average_ranks"][c]] for c in ranking["criteria"]]
        parts.append(_table(["criterion (best first)", "average rank"], rows))
    for split, reason in analysis.get("skipped", {}).items():
        title = SPLIT_TITLES.get(split, split)
        parts.append(f"<p class='note'>{html.escape(title)}: {html.escape(reason)}</p>")
    return "\n".join(parts)


def _structure(analysis: dict[str, Any] | None) -> str:
    """Per setting, the reference overlaps and the consensus of the end masks (Section 5.4):
    J_r (the first update's random removal sets from different seeds' initial masks, Figure
    6a), J_init (the initial masks of different seeds, Figure 6b), and the shares of the
    weights every criterion keeps and every one removes (Figure 19). A value the analysis has
    not (``None``) reads "-"."""
    settings: dict[str, dict[str, Any]] = {}
    for entry in (analysis or {}).get("removal", []):
        settings.setdefault(setting_title(entry["setting"]), {})["j_r"] = entry.get("j_r")
    for entry in (analysis or {}).get("structure", []):
        row = settings.setdefault(setting_title(entry["setting"]), {})
        row["j_init"] = entry.get("j_init")
        shares = entry.get("consensus") or {}
        for key in ("kept_by_all", "removed_by_all"):
            if key in shares:
                row[key] = format_stat(shares[key]["mean"], shares[key]["std"])
    if not settings:
        return (
            "<p class='note'>no structure data (the runs need analysis.removal_sets, or "
            "kept masks of several criteria)</p>"
        )
    header = ["setting", "J_r (first update)", "J_init", "kept by all criteria"]
    header += ["removed by all criteria"]
    rows = [
        [name, row.get("j_r"), row.get("j_init"), row.get("kept_by_all"), row.get("removed_by_all")]
        for name, row in settings.items()
    ]
    return _table(header, rows)


def _figures(images: dict[str, bytes]) -> str:
    """The figures, grouped by the paper's figure they reproduce."""
    if not images:
        return "<p class='note'>no figures for this study (yet)</p>"
    groups: dict[str, list[str]] = {}
    for name in images:
        groups.setdefault(kind_of(name), []).append(name)
    parts = []
    for kind, names in groups.items():
        parts.append(f"<h3>{html.escape(KINDS.get(kind, kind))}</h3>")
        parts += [
            f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
            f"{base64.b64encode(images[name]).decode()}'>"
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
            for name in names
        ]
    return "\n".join(parts)
