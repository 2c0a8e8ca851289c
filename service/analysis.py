"""A study's paper-style analysis from its stored trials (runs in the API process).

From the trials' final metrics, their per-epoch histories and the masks the job driver keeps
(no MLflow call): the criteria rankings of Figure 3 (average ranks within each group of
everything else the study varies, Friedman's test, the Nemenyi critical distance and its
cliques; for all densities, ≤ 0.2 and > 0.2); the learning curves and loss gaps of Figures 2
and 4 per setting, with the baselines; the structure of Section 5.4: the removal-set Jaccard
index at the first update (Figure 6a, with J_r) and over training (Figure 18), the end-mask
Jaccard index (Figure 6b) with J_init and the weights every criterion keeps or removes
(Figure 19). A Jaccard index with no value (both sets empty in every layer: an update that
removes nothing, see :mod:`dst.structure`) is ``None``, a gap, never a number. A study
still running gets the same analysis over what has finished, marked ``partial``. Which
figures are drawn from it is :mod:`service.figures`'s business.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dst.spec import RunSpec
from service.results import (
    Results,
    grouped_stats,
    run_config,
    sample_mean,
    sample_std,
    summarize,
)

CRITERION, GROWTH, DENSITY, MODE = (
    "sparsity.criterion",
    "sparsity.growth",
    "sparsity.density",
    "sparsity.mode",
)
PERIOD, LAMBDA = "sparsity.update_period", "sparsity.mest_lambda"
DROPOUT = "training.dropout"
CURVE_METRICS = ("val_acc", "train_loss", "loss_gap")  # Figures 2 and 4, per epoch
SPLITS = ("all", "low", "high")  # Figure 3a-c: all densities, ≤ 0.2, > 0.2
INITIAL, FINAL = "initial.npz", "final.npz"  # a finished trial's masks, kept by the driver
FIRST_REMOVAL = "removal_first.json"  # its per-layer removal-set Jaccard at the first update


def experiment_masks_dir(storage_path: Path, experiment_id: str) -> Path:
    """Where a study's finished trials keep their masks (shared by the driver and the API)."""
    return storage_path / "masks" / experiment_id


def trial_masks_dir(experiment_dir: Path, index: int) -> Path:
    return experiment_dir / str(index)


@dataclass(frozen=True)
class FinishedTrial:
    """What the analysis reads of one succeeded trial."""

    spec: RunSpec
    metrics: dict[str, float]
    index: int = -1  # the trial's index (its masks' directory)
    history: Sequence[dict[str, float]] = ()  # its per-epoch metrics, in epoch order


@dataclass
class StudyAnalysis:
    """Rankings (by density split) and the results table a study's figures are drawn from."""

    partial: bool
    n_finished: int
    group_by: list[str]
    ranked_within: list[str]  # the fields that form a ranking group
    rankings: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # split -> why there is no ranking
    results: Results | None = None
    structure: list[dict[str, Any]] = field(default_factory=list)  # Figures 6b, 19 per setting
    removal: list[dict[str, Any]] = field(default_factory=list)  # Figure 6a per setting
    over_time: list[dict[str, Any]] = field(default_factory=list)  # Figure 18 per setting
    curves: list[dict[str, Any]] = field(default_factory=list)  # Figures 2, 4 per setting
    itop: list[dict[str, Any]] = field(default_factory=list)  # final ITOP rows (Figure 11)
    # final validation accuracy per configuration, as results rows (Figure 5)
    validation: list[dict[str, Any]] = field(default_factory=list)
    # the one value of each field the study does not vary, as its DST trials have it (e.g.
    # the criterion and growth every run used): what a figure labels its lines and panels by
    fixed: dict[str, Any] = field(default_factory=dict)
    # what the criteria are ranked by (the study's ranking.metric), and the summary's "best"
    ranking_metric: str = "test_acc"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (strict JSON: a NaN or infinite number is ``None``), without what the
        figures alone read (the results table, the fixed values, the validation rows)."""
        from dst.ranking import strict_json  # (imported once the analysis has run)

        out = asdict(self)
        out.pop("results")
        out.pop("fixed")
        out.pop("validation")
        return strict_json(out)


@functools.cache
def preload() -> None:
    """Import what analysing a study and drawing its figures import (SciPy's statistics and the
    Nemenyi test, PyTorch for the masks, Matplotlib): seconds on a small machine. The API
    calls this after launching a study, so the analysis at the study's end does not pay them.
    """
    import dst.figures
    import dst.ranking
    import dst.structure  # noqa: F401


def analyze(
    specs: Sequence[RunSpec],
    finished: Sequence[FinishedTrial],
    partial: bool,
    mask_dir: Path | None = None,
    metric: str = "test_acc",
) -> StudyAnalysis:
    """The analysis of a study whose trials are ``specs``, from its ``finished`` trials (and
    their masks in ``mask_dir``, for the structure of Figures 6 and 19 and J_r), ranking the
    criteria by ``metric`` (the study's ``ranking.metric``)."""
    results = summarize(specs, [(t.spec, t.metrics) for t in finished])
    within = [f for f in results.group_by if f not in (CRITERION, MODE)]
    analysis = StudyAnalysis(partial, len(finished), results.group_by, within, results=results)
    analysis.ranking_metric = metric
    analysis.fixed = fixed_values(specs, results.group_by)
    if mask_dir is not None and CRITERION in results.group_by:
        analysis.structure = end_mask_structure(finished, within, mask_dir)
    references = random_references(finished, within, mask_dir) if mask_dir else {}
    analysis.removal = first_update_structure(finished, within, references, mask_dir)
    analysis.over_time = removal_over_time(finished, within)
    analysis.curves = learning_curves(finished, within)
    analysis.itop = metric_rows(finished, results.group_by, "itop")
    analysis.validation = metric_rows(finished, results.group_by, "val_acc")
    if CRITERION not in results.group_by:
        analysis.skipped = {s: "the study does not vary the pruning criterion" for s in SPLITS}
        return analysis
    scores = _scores(finished, within, metric)
    criteria = list(dict.fromkeys(s["criterion"] for s in scores))  # the whole study's
    for split in SPLITS:
        ranking, reason = _ranking(scores, within, split, criteria, metric)
        if ranking is not None:
            analysis.rankings[split] = ranking
        else:
            analysis.skipped[split] = reason or "nothing to rank"
    return analysis


def fixed_values(specs: Iterable[RunSpec], varied: Sequence[str]) -> dict[str, Any]:
    """The value of every field not in ``varied``, as the study's DST trials all have it
    (``{}`` for a study without DST trials)."""
    for spec in specs:
        if spec.sparsity.mode == "dst":
            return {k: v for k, v in run_config(spec).items() if k not in varied}
    return {}


def _setting(trial: FinishedTrial, within: Sequence[str]) -> str:
    """The setting a trial belongs to: its values of ``within`` (as a JSON key)."""
    config = run_config(trial.spec)
    return json.dumps({f: config.get(f) for f in within})


def _is_dst(trial: FinishedTrial) -> bool:
    return trial.spec.sparsity.mode == "dst"


def _defined(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers (a Jaccard index without a value is NaN or ``None``)."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _number(value: float | None) -> float | None:
    """A value for strict JSON: ``None`` for NaN or nothing."""
    return None if value is None or math.isnan(value) else float(value)


def _scores(
    finished: Sequence[FinishedTrial], within: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """Ranking inputs: DST trials with a value of ``metric``, grouped by ``within``."""
    scores = []
    for trial in finished:
        config = run_config(trial.spec)
        if trial.spec.sparsity.mode != "dst" or metric not in trial.metrics:
            continue
        scores.append(
            {
                "criterion": config[CRITERION],
                "group": tuple(json.dumps(config.get(f)) for f in within),
                "density": trial.spec.sparsity.density,
                "seed": trial.spec.seed,
                "test_acc": trial.metrics[metric],  # what dst.ranking ranks by
            }
        )
    return scores


def _ranking(
    scores: list[dict[str, Any]],
    within: Sequence[str],
    split: str,
    criteria: Sequence[str],
    metric: str,
) -> tuple[dict[str, Any] | None, str | None]:
    """One density split's ranking of ``criteria`` by ``metric`` (named in the result as
    ``metric``; ``criteria`` are every criterion of the study, so a group
    of the split without a result of one is dropped and listed, as in the "all" split; a
    split where no group has them all has no ranking, and the reason says which is missing).
    """
    from dst.ranking import rank_criteria

    keep: Callable[[dict[str, Any]], bool] = {
        "all": lambda s: True,
        "low": lambda s: s["density"] <= 0.2,
        "high": lambda s: s["density"] > 0.2,
    }[split]
    kept = [s for s in scores if keep(s)]
    if not kept:
        return None, "no finished DST trial in this density range"
    try:
        ranking = rank_criteria(kept, criteria=criteria)
    except ValueError as error:
        return None, str(error)
    out = {"metric": metric} | ranking.to_dict()
    out["groups"] = [dict(zip(within, map(json.loads, g), strict=True)) for g in ranking.groups]
    out["dropped_groups"] = [
        dict(zip(within, map(json.loads, g), strict=True)) for g in ranking.dropped_groups
    ]
    return out, None


def result_rows(analysis: StudyAnalysis) -> list[dict[str, Any]]:
    """The results table's rows in their JSON form (what :mod:`dst.figures` draws from)."""
    assert analysis.results is not None
    return [asdict(row) for row in analysis.results.rows]


def rankings_csv(analysis: StudyAnalysis) -> str:
    """One line per density split and criterion: its average rank, best first (and the
    metric ranked by)."""
    lines = ["split,criterion,average_rank,n_groups,critical_distance,metric"]
    for split, ranking in analysis.rankings.items():
        for criterion in ranking["criteria"]:
            rank = ranking["average_ranks"][criterion]
            lines.append(
                f"{split},{criterion},{rank:.4f},{ranking['n_groups']},"
                f"{ranking['critical_distance'] or ''},{ranking['metric']}"
            )
    return "\n".join(lines) + "\n"


def setting_slug(setting: Mapping[str, Any]) -> str:
    """A setting as a file-name part: ``growth-gradient_density-0.1``."""
    parts = [f"{key.rpartition('.')[2]}-{value}" for key, value in setting.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


def setting_hash(setting: Mapping[str, Any]) -> str:
    """A short hash of a setting's values, the same in every process and run."""
    text = json.dumps(setting, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


MAX_SETTING_NAME = 200  # characters of a figure's or tag's name (file systems take 255 bytes)


def setting_names(stem: str, settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of ``settings`` (figures, MLflow tags): ``stem`` for one setting, else
    ``stem_<slug>``; ``stem_<slug>_<hash>`` where two settings share a slug (values that
    differ only in characters :func:`setting_slug` replaces), so no name is another's; and
    ``stem_<hash>`` where the slug would make the name longer than :data:`MAX_SETTING_NAME`
    (a long data root), which a file name or an MLflow tag could not take."""
    if len(settings) == 1:
        return [stem]
    slugs = [setting_slug(setting) for setting in settings]
    shared = {slug for slug, count in Counter(slugs).items() if count > 1}
    names = []
    for slug, setting in zip(slugs, settings, strict=True):
        name = f"{stem}_{slug}_{setting_hash(setting)}" if slug in shared else f"{stem}_{slug}"
        names.append(name if len(name) <= MAX_SETTING_NAME else f"{stem}_{setting_hash(setting)}")
    return names


def summary(analysis: StudyAnalysis) -> tuple[dict[str, float], dict[str, str]]:
    """What the MLflow runs table shows of a study: the mean final test accuracy of each
    criterion (metrics ``mean_test_acc.<criterion>``, over every DST configuration and seed;
    also ``mean_test_acc_at_best_val.<criterion>`` when the study ranks by it) and the best
    criterion by the ranking's metric at each density of each setting (everything varied but
    the criterion and the density): tags ``best_criterion.density_<d>`` for a study of one
    setting, else ``best_criterion.density_<d>_<setting>`` (named as the figures are, e.g.
    ``best_criterion.density_0.1_growth-gradient``; ``_<hash>`` alone for a long setting).
    A criterion or density the study does not vary counts with its one value. A row whose
    mean is not a finite number counts nowhere: MLflow gets no NaN metric."""
    ranked_by = analysis.ranking_metric
    metrics: dict[str, float] = {}
    for metric in dict.fromkeys(("test_acc", ranked_by)):
        for criterion, means in _criterion_means(analysis, metric).items():
            metrics[f"mean_{metric}.{criterion}"] = sum(means) / len(means)
    return metrics, _best_criteria(analysis, ranked_by)


def _dst_rows(analysis: StudyAnalysis, metric: str) -> Iterator[tuple[str, dict[str, Any], float]]:
    """The results table's DST rows with a finite mean of ``metric``: (criterion, config,
    mean), a field the study does not vary read as its one value."""
    fixed = analysis.fixed
    for row in result_rows(analysis):
        if row["config"].get(MODE, "dst") != "dst":
            continue
        criterion, mean = row["config"].get(CRITERION, fixed.get(CRITERION)), row[f"{metric}_mean"]
        if criterion is not None and mean is not None and math.isfinite(mean):
            yield criterion, row["config"], mean


def _criterion_means(analysis: StudyAnalysis, metric: str) -> dict[str, list[float]]:
    """Each criterion's row means of ``metric``, over every DST configuration."""
    by_criterion: dict[str, list[float]] = {}
    for criterion, _, mean in _dst_rows(analysis, metric):
        by_criterion.setdefault(criterion, []).append(mean)
    return by_criterion


def _best_criteria(analysis: StudyAnalysis, metric: str) -> dict[str, str]:
    """The ``best_criterion.density_<d>[_<setting>]`` tags: the criterion with the highest
    mean ``metric`` at each density of each setting."""
    fields = [f for f in analysis.group_by if f not in (MODE, CRITERION, DENSITY)]
    settings: list[dict[str, Any]] = []
    best: dict[tuple[int, str], tuple[float, str]] = {}  # (setting, density) -> (mean, best)
    for criterion, config, mean in _dst_rows(analysis, metric):
        density = config.get(DENSITY, analysis.fixed.get(DENSITY))
        setting = {f: config.get(f) for f in fields}
        if setting not in settings:
            settings.append(setting)
        key = (settings.index(setting), str(density))
        if density is not None and (key not in best or mean > best[key][0]):
            best[key] = (mean, criterion)
    suffixes = setting_names("", settings)  # "" for one setting, else "_<setting>"
    return {
        f"best_criterion.density_{density}{suffixes[index]}": criterion
        for (index, density), (_, criterion) in best.items()
    }


FIRST_UPDATE = "removal_jaccard_first."  # a run's metrics with analysis.removal_sets


def first_update_structure(
    finished: Sequence[FinishedTrial],
    within: Sequence[str],
    references: dict[str, float] | None = None,
    mask_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Figure 6a per setting, from runs with ``analysis.removal_sets``: row = the run's own
    criterion, column = another criterion, value = the Jaccard index (Eq. 1, mean over layers)
    of the sets both would prune at the run's first topology update, from its own state;
    mean over seeds, with the setting's J_r (``references``) where known.

    Where every run of the setting kept its per-layer indices in ``mask_dir``, mean and std
    are Appendix K's (Figures 6a, 20): over seeds for each layer, then over layers
    (:func:`dst.structure.seeds_then_layers`: a layer where both sets are empty in a seed
    counts in the others); otherwise (older runs) they are taken over the seeds' layer means
    (``std_per_layer`` false). A cell no seed has a value for is ``None``."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    runs: dict[str, dict[str, int]] = {}  # setting -> row criterion -> runs (seeds)
    layers: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = {}
    for trial in finished:
        row = {
            k[len(FIRST_UPDATE) :]: v
            for k, v in trial.metrics.items()
            if k.startswith(FIRST_UPDATE)
        }
        if not row:
            continue
        key, criterion = _setting(trial, within), str(trial.spec.sparsity.criterion)
        own = cells.setdefault(key, {}).setdefault(criterion, {})
        runs.setdefault(key, {})[criterion] = runs.get(key, {}).get(criterion, 0) + 1
        for other, value in row.items():
            own.setdefault(other, []).append(value)
        kept = _first_removal_layers(mask_dir, trial.index)
        if kept is not None:
            layers.setdefault(key, {}).setdefault(criterion, []).append(kept)
    out = []
    for key, rows in cells.items():
        names = list(rows)
        columns = names + sorted({c for r in rows.values() for c in r} - set(names))
        seeds = max(len(v) for r in rows.values() for v in r.values())
        by_layer = layers.get(key, {})
        per_layer = all(len(by_layer.get(r, [])) == runs[key][r] for r in names)
        kept_layers = {r: by_layer[r] if per_layer else None for r in names}
        stats = [
            [_first_update_cell(rows[r].get(c, []), kept_layers[r], c) for c in columns]
            for r in names
        ]
        out.append(
            {
                "setting": json.loads(key),
                "rows": names,
                "columns": columns,
                "mean": [[mean for mean, _ in row] for row in stats],
                "std": [[std for _, std in row] for row in stats],
                "std_per_layer": per_layer,
                "n_seeds": seeds,
                "j_r": (references or {}).get(key),
            }
        )
    return out


def _first_update_cell(
    values: Sequence[float | None],
    seeds: list[dict[str, dict[str, float]]] | None,
    column: str,
) -> tuple[float | None, float | None]:
    """One cell of Figure 6a: (mean, std) over seeds, from the per-layer indices of the row's
    runs (``seeds``) where they hold ``column``, else from the runs' layer means
    (``values``); only the seeds with a value count."""
    if seeds is not None:
        found = _layer_stats(seeds, column)
        if found is not None:
            return found
    defined = _defined(values)
    return sample_mean(defined), sample_std(defined)


def _first_removal_layers(mask_dir: Path | None, index: int) -> dict[str, dict[str, float]] | None:
    """A trial's per-layer removal-set Jaccard index at its first update, if kept."""
    if mask_dir is None:
        return None
    path = trial_masks_dir(mask_dir, index) / FIRST_REMOVAL
    return dict(json.loads(path.read_text())) if path.exists() else None


def _layer_stats(
    seeds: list[dict[str, dict[str, float]]], column: str
) -> tuple[float | None, float | None] | None:
    """Appendix K for removal sets: the mean over seeds of each layer's index, then over the
    layers; the std over seeds of each layer's index, averaged over the layers (``None`` with
    fewer than two seeds). ``None`` when no seed holds ``column``."""
    import numpy as np

    from dst.structure import seeds_then_layers

    runs = [seed[column] for seed in seeds if column in seed]
    if not runs:
        return None
    names = list(runs[0])
    values = np.array(
        [[math.nan if run.get(name) is None else run[name] for name in names] for run in runs],
        dtype=float,
    )  # [seeds, layers]
    mean, std = seeds_then_layers(values, ddof=1)
    return _number(float(mean)), _number(float(std)) if len(runs) > 1 else None


def end_mask_structure(
    finished: Sequence[FinishedTrial], within: Sequence[str], mask_dir: Path
) -> list[dict[str, Any]]:
    """Figure 6b per setting (everything varied but the criterion and the seed): the Jaccard
    index (Eq. 1, mean over layers) between the end masks of trials that differ only in the
    criterion (same seed, so the same initial mask), and of each with that initial mask
    (row ``init``), mean and std over seeds (Appendix K), with J_init, the mean pairwise
    Jaccard of the initial masks of different seeds. Only seeds where every criterion of the
    setting finished count; settings with fewer than two criteria are left out.

    Beside it, Figure 19: the share of the active weights that every criterion's end mask
    keeps and of the inactive weights that every one removes, mean and std over seeds."""
    from dst.masks import load_masks
    from dst.structure import consensus, end_mask_jaccard_over_seeds, initial_mask_reference

    settings: dict[str, dict[int, dict[str, Path]]] = {}
    criteria: dict[str, list[str]] = {}
    for trial in finished:
        directory = trial_masks_dir(mask_dir, trial.index)
        if not _is_dst(trial) or not (directory / FINAL).exists():
            continue
        key = _setting(trial, within)
        criterion = str(trial.spec.sparsity.criterion)
        settings.setdefault(key, {}).setdefault(trial.spec.seed, {})[criterion] = directory
        if criterion not in criteria.setdefault(key, []):
            criteria[key].append(criterion)
    out = []
    for key, seeds in settings.items():
        names = criteria[key]
        complete = {seed: runs for seed, runs in seeds.items() if set(runs) == set(names)}
        if len(names) < 2 or not complete:
            continue
        per_seed, initials, kept, removed = [], [], [], []
        for runs in complete.values():
            masks = {name: load_masks(runs[name] / FINAL) for name in names}
            agreed = consensus(masks)
            kept.append(agreed.kept_by_all)
            removed.append(agreed.removed_by_all)
            masks["init"] = load_masks(runs[names[0]] / INITIAL)
            initials.append(masks["init"])
            per_seed.append(masks)
        stats = end_mask_jaccard_over_seeds(per_seed, [*names, "init"])
        j_init = initial_mask_reference(initials) if len(initials) > 1 else None
        shares = {
            "kept_by_all": {"mean": sample_mean(kept), "std": sample_std(kept)},
            "removed_by_all": {"mean": sample_mean(removed), "std": sample_std(removed)},
        }
        out.append(
            {
                "setting": json.loads(key),
                "jaccard": stats.to_dict(),
                "j_init": j_init,
                "consensus": shares,
            }
        )
    return out


def first_update_fraction(spec: RunSpec, total_steps: int) -> float:
    """ρ at a run's first topology update (step Δt), from its spec and its total step count
    (what the prune schedule's stop step T defaults to)."""
    from dst.schedules import PruneSchedule

    s = spec.sparsity
    stop = s.stop_step or total_steps
    schedule = PruneSchedule(
        s.schedule, s.prune_fraction, s.update_period, stop, s.schedule_interval, s.schedule_factor
    )
    return schedule.fraction(s.update_period)


def random_references(
    finished: Sequence[FinishedTrial], within: Sequence[str], mask_dir: Path
) -> dict[str, float]:
    """J_r per setting (Figure 6a) as the paper defines it: the mean pairwise Jaccard index of
    random removal sets of the first update's size drawn from the initial masks of the
    setting's different seeds (:func:`dst.structure.random_removal_reference`). It is the
    first update's reference only (later updates remove fewer weights). Settings with one
    seed, or whose first update removes nothing, have none."""
    from dst.masks import load_masks
    from dst.structure import random_removal_reference

    seeds: dict[str, dict[int, FinishedTrial]] = {}
    for trial in finished:
        if _is_dst(trial) and (trial_masks_dir(mask_dir, trial.index) / INITIAL).exists():
            seeds.setdefault(_setting(trial, within), {}).setdefault(trial.spec.seed, trial)
    out = {}
    for key, trials in seeds.items():
        first = next(iter(trials.values()))
        total = int(first.metrics.get("step", 0))
        if len(trials) < 2 or total <= first.spec.sparsity.update_period:
            continue  # one seed, or no topology update at all
        initials = [
            load_masks(trial_masks_dir(mask_dir, t.index) / INITIAL) for t in trials.values()
        ]
        fraction = first_update_fraction(first.spec, total)
        j_r = random_removal_reference(initials, fraction, scope=first.spec.sparsity.scope)
        if not math.isnan(j_r):
            out[key] = j_r
    return out


OVER_TIME = "removal_jaccard."  # a run's per-epoch metrics with analysis.removal_sets


def removal_points(
    history: Sequence[Mapping[str, float]], column: str
) -> list[tuple[float, float]]:
    """(step, Jaccard with ``column``'s removal set) of every epoch from the first that has
    one (an epoch before the first topology update has none). An index without a value
    (NaN or ``None``: the update removed nothing, see :mod:`dst.structure`) is NaN, a gap in
    the line rather than a point."""
    metric = OVER_TIME + column
    first = next((i for i, h in enumerate(history) if metric in h), None)
    if first is None:
        return []
    points = []
    for h in history[first:]:
        value = h.get(metric)
        points.append((h["step"], math.nan if value is None else float(value)))
    return points


def removal_columns(histories: Iterable[Sequence[Mapping[str, float]]]) -> list[str]:
    """The criteria whose removal sets the runs of ``histories`` were compared with."""
    return sorted(
        {k[len(OVER_TIME) :] for h in histories for m in h for k in m if k.startswith(OVER_TIME)}
    )


def removal_over_time(
    finished: Sequence[FinishedTrial], within: Sequence[str]
) -> list[dict[str, Any]]:
    """Figure 18 per setting, from runs with ``analysis.removal_sets``: for each criterion a
    run was trained with (row) and each other criterion (column), the Jaccard index of what
    the run removed at its latest topology update of each epoch with what the other criterion
    would have removed from the same state, against the training step; mean and std over the
    seeds with a value at each point (cut to the shortest history), ``None`` where no seed
    has one (a gap). Not symmetric (Appendix K). No J_r: the first update's reference does
    not hold for later updates, which remove fewer weights."""
    runs: dict[str, dict[str, list[Sequence[dict[str, float]]]]] = {}
    for trial in finished:
        if _is_dst(trial) and any(OVER_TIME in k for k in trial.metrics):
            row = str(trial.spec.sparsity.criterion)
            runs.setdefault(_setting(trial, within), {}).setdefault(row, []).append(trial.history)
    out = []
    for key, rows in runs.items():
        columns = removal_columns(h for histories in rows.values() for h in histories)
        lines: dict[str, dict[str, Any]] = {}
        for row, histories in rows.items():
            lines[row] = {}
            for column in columns:
                seeds = [p for p in (removal_points(h, column) for h in histories) if p]
                if not seeds:
                    continue
                length = min(len(p) for p in seeds)
                lines[row][column] = {
                    "step": [seeds[0][i][0] for i in range(length)],
                    **_defined_mean_std_over_seeds([[v for _, v in p[:length]] for p in seeds]),
                    "n_seeds": len(seeds),
                }
        out.append({"setting": json.loads(key), "lines": lines})
    return out


def _defined_mean_std_over_seeds(
    values: list[list[float]],
) -> dict[str, list[float | None] | None]:
    """``values[seed][point]``, NaN where a seed has no value: per point the mean and sample
    std over the seeds that have one (``None`` where none has, or, for the std, fewer than
    two); no std at all for one seed."""
    import numpy as np

    from dst.structure import mean_where_defined, std_where_defined

    array = np.asarray(values, dtype=float)  # [seeds, points]
    mean = [_number(v) for v in mean_where_defined(array, axis=0).tolist()]
    std = [_number(v) for v in std_where_defined(array, ddof=1).tolist()]
    return {"mean": mean, "std": std if len(values) > 1 else None}


BASELINE_LABELS = ("dense", "dense + dropout", "static")  # the lines of Figures 1 and 4


def _baseline_label(spec: RunSpec) -> str:
    """How Figures 1 and 4 name a baseline run (one of :data:`BASELINE_LABELS`)."""
    if spec.sparsity.mode == "dense":
        return BASELINE_LABELS[1] if spec.training.dropout else BASELINE_LABELS[0]
    return BASELINE_LABELS[2]


def baseline_matches(config: Mapping[str, Any], setting: Mapping[str, Any], dense: bool) -> bool:
    """A baseline (its ``config``; ``dense``: a dense run) belongs beside a setting when it
    agrees on every field it has a value for: a static run on the density, a dense run on
    nothing sparse; dropout never counts (the dense + dropout baseline differs in it on
    purpose). The learning curves and the figures' baselines both follow this rule."""
    for key, value in setting.items():
        own = config.get(key)
        if own is None or key == DROPOUT or (dense and key.startswith("sparsity.")):
            continue
        if own != value:
            return False
    return True


def _curve(histories: Sequence[Sequence[dict[str, float]]]) -> dict[str, Any]:
    """Per-epoch mean and std over seeds of :data:`CURVE_METRICS` (cut to the shortest)."""
    length = min(len(h) for h in histories)
    out: dict[str, Any] = {"epoch": [h["epoch"] for h in histories[0][:length]]}
    out["n_seeds"] = len(histories)
    for metric in CURVE_METRICS:
        out[metric] = _mean_std_over_seeds(
            [[h[i][metric] for i in range(length)] for h in histories]
        )
    return out


def _mean_std_over_seeds(values: list[list[float]]) -> dict[str, list[float] | None]:
    """``values[seed][point]``: mean and sample std over seeds per point (no std for one)."""
    import numpy as np

    array = np.asarray(values, dtype=float)  # [seeds, points]
    std = array.std(axis=0, ddof=1).tolist() if len(values) > 1 else None
    return {"mean": array.mean(axis=0).tolist(), "std": std}


def learning_curves(
    finished: Sequence[FinishedTrial], within: Sequence[str]
) -> list[dict[str, Any]]:
    """Figures 2 and 4 per setting (everything varied but the criterion and the seed): for
    each criterion and each baseline beside it (dense, dense + dropout, static at the same
    density), the per-epoch validation accuracy, training loss and loss gap, mean and std over
    seeds, and each line's final test accuracy, mean and sample std over seeds (``None`` for
    one seed; Figure 4 right)."""
    groups: dict[str, dict[str, list[FinishedTrial]]] = {}
    for trial in finished:
        if _is_dst(trial) and trial.history:
            label = str(trial.spec.sparsity.criterion)
            groups.setdefault(_setting(trial, within), {}).setdefault(label, []).append(trial)
    baselines = [t for t in finished if not _is_dst(t) and t.history]
    out = []
    for key, lines in groups.items():
        setting = json.loads(key)
        for baseline in baselines:
            dense = baseline.spec.sparsity.mode == "dense"
            if baseline_matches(run_config(baseline.spec), setting, dense):
                lines.setdefault(_baseline_label(baseline.spec), []).append(baseline)
        curves = {}
        for label, trials in lines.items():
            curves[label] = _curve([t.history for t in trials])
            accuracies = [t.metrics["test_acc"] for t in trials if "test_acc" in t.metrics]
            curves[label]["test_acc"] = sample_mean(accuracies)
            curves[label]["test_acc_std"] = sample_std(accuracies)
        out.append({"setting": setting, "lines": curves})
    return out


def metric_rows(
    finished: Sequence[FinishedTrial], group_by: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """A final metric (e.g. ``itop``, or ``val_acc`` for Figure 5) averaged over the seeds
    that recorded it, per configuration, as rows of the results table's JSON form."""
    recorded = [(t.spec, t.metrics) for t in finished if metric in t.metrics]
    return grouped_stats(recorded, group_by, [metric])


class AnalysisCache:
    """The latest analyses of a few studies, each kept while its trials have not changed.

    A study's analysis reads every trial's history and masks; a report or a page of figures
    asks for it once per figure. ``version`` is what changes whenever a trial reports (see
    :func:`service.crud.trials_version`), so a finished study is analysed once, and requests
    that arrive together for the same study wait for one computation rather than each doing
    it (requests for other studies do not wait).
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[object, StudyAnalysis]] = OrderedDict()
        self._computing: dict[str, threading.Lock] = {}

    def get(
        self, experiment_id: str, version: object, compute: Callable[[], StudyAnalysis]
    ) -> StudyAnalysis:
        """The cached analysis of ``experiment_id`` at ``version``, else ``compute()`` it."""
        with self._lock:
            study_lock = self._computing.setdefault(experiment_id, threading.Lock())
        with study_lock:  # one computation per study at a time
            found = self._lookup(experiment_id, version)
            if found is not None:
                return found
            analysis = compute()
            with self._lock:
                self._entries[experiment_id] = (version, analysis)
                self._entries.move_to_end(experiment_id)
                while len(self._entries) > self.size:
                    dropped, _ = self._entries.popitem(last=False)
                    self._computing.pop(dropped, None)
            return analysis

    def _lookup(self, experiment_id: str, version: object) -> StudyAnalysis | None:
        with self._lock:
            found = self._entries.get(experiment_id)
            if found is None or found[0] != version:
                return None
            self._entries.move_to_end(experiment_id)
            return found[1]
