"""The ``dst`` command line: train one run, inspect models, list registered names.

The registries and PyTorch are imported inside the commands that use them, so ``dst --help``
(and every service command) answers without paying for them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pydantic import ValidationError

    from dst.spec import RunSpec

app = typer.Typer(help="DST Lab: dynamic sparse training studies.", no_args_is_help=True)
log = logging.getLogger("dst")

# The dataset each model is paired with in the paper (Section 5.1), for `dst inspect MODEL`.
PAPER_DATASET = {
    "small-mlp": "higgs",
    "large-mlp": "cifar10",
    "small-cnn": "cifar10",
    "lenet5-caffe": "fashion-mnist",
    "resnet56": "cifar10",
    "vgg16": "cifar100",
    "efficientnet-b0": "tiny-imagenet",
    "resnet50": "imagenet",
}


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``field.path: message``."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "spec"
        lines.append(f"  {path}: {item['msg']}")
    return "invalid spec:\n" + "\n".join(lines)


def fail(message: str) -> typer.Exit:
    """Print ``message`` to stderr and return an exit-code-2 error to raise."""
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def load_run_spec(path: Path, overrides: list[str]) -> RunSpec:
    """Read, override and validate a run spec; bad input exits with a clear message."""
    import yaml
    from pydantic import ValidationError

    from dst.spec import RunSpec, apply_overrides, read_spec_file

    try:
        return RunSpec.model_validate(apply_overrides(read_spec_file(path), overrides))
    except ValidationError as error:
        raise fail(format_validation_error(error)) from None
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise fail(f"cannot read spec {path}: {error}") from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Configure logging for every command."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="run spec (YAML or JSON)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. sparsity.density=0.05")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train one run; write metrics.jsonl and the initial and final masks to OUT."""
    import yaml

    from dst.masks import save_masks
    from dst.training import Trainer  # heavy imports only when training

    spec = load_run_spec(spec_path, set_ or [])
    out = out or Path("runs") / (spec.name or f"{spec.model}-{spec.dataset}-{spec.sparsity.mode}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        resolved = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        (out / "spec.yaml").write_text(resolved)
    except OSError as error:
        raise fail(f"cannot write to --out {out}: {error.strerror or error}") from None
    try:
        trainer = Trainer(spec)  # reads (or downloads) the data: a missing dataset says how
    except (RuntimeError, ValueError) as error:  # to get it, on one line
        raise fail(str(error)) from None
    except OSError as error:  # the data root cannot be made or read, say
        raise fail(f"cannot prepare the run: {error}") from None
    save_masks(trainer.initial_masks, out / "masks" / "initial.npz")
    with (out / "metrics.jsonl").open("w") as metrics_file:

        def write(metrics: dict[str, float]) -> None:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()

        history = trainer.fit(on_epoch=write, progress=progress)
    save_masks(trainer.masks, out / "masks" / "final.npz")
    last = history[-1]
    typer.echo(
        f"done: test_acc={last['test_acc']:.4f} test_loss={last['test_loss']:.4f} "
        f"test_acc_at_best_val={last['test_acc_at_best_val']:.4f} "
        f"(epoch {last['best_val_epoch']}) density={last['density']:.4f} "
        f"itop={last['itop']:.4f} -> {out}"
    )


def inspect_model(name: str, dataset: str, density: float, init: str | None) -> dict[str, Any]:
    """Per-layer shapes, sizes, densities and active counts of ``name`` built for ``dataset``."""
    from dst.datasets import get_dataset
    from dst.distributions import layer_densities
    from dst.masks import active_count, prunable_weights
    from dst.models import build_model, get_model

    entry = get_model(name)
    model = build_model(name, get_dataset(dataset).info)
    weights = prunable_weights(model)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    densities = layer_densities(shapes, density, init or entry.default_init)
    layers: list[dict[str, Any]] = [
        {
            "name": n,
            "shape": list(shapes[n]),
            "params": w.numel(),
            "density": densities[n],
            "active": active_count(densities[n], w.numel()),
        }
        for n, w in weights.items()
    ]
    prunable = sum(layer["params"] for layer in layers)
    active = sum(layer["active"] for layer in layers)
    return {
        "model": name,
        "dataset": dataset,
        "init": init or entry.default_init,
        "layers": layers,
        "total_params": sum(p.numel() for p in model.parameters()),
        "prunable_params": prunable,
        "active_params": active,
        "density": active / prunable,
    }


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="model name (see `dst models`)")],
    dataset: Annotated[str | None, typer.Option(help="dataset (default: the paper's)")] = None,
    density: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.05,
    init: Annotated[str | None, typer.Option(help="uniform, er or erk")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show each prunable layer's shape, size, density and active count."""
    from dst.distributions import DISTRIBUTIONS
    from dst.registry import UnknownNameError

    if not 0 < density <= 1:
        raise fail(f"--density must be in (0, 1], got {density}")
    try:
        if init is not None:
            DISTRIBUTIONS.get(init)
        report = inspect_model(model, dataset or PAPER_DATASET.get(model, "digits"), density, init)
    except (UnknownNameError, ValueError) as error:
        raise fail(str(error)) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['model']} on {report['dataset']} ({report['init']}, D={density})")
    typer.echo(f"{'layer':<40} {'shape':<22} {'params':>11} {'density':>8} {'active':>10}")
    for layer in report["layers"]:
        shape = "x".join(str(s) for s in layer["shape"])
        typer.echo(
            f"{layer['name']:<40} {shape:<22} {layer['params']:>11,} "
            f"{layer['density']:>8.4f} {layer['active']:>10,}"
        )
    typer.echo(
        f"total params {report['total_params']:,}; prunable {report['prunable_params']:,}; "
        f"active {report['active_params']:,} (density {report['density']:.4f})"
    )


@app.command()
def models() -> None:
    """List the registered models."""
    from dst.models import MODELS

    for name in MODELS:
        typer.echo(f"{name:<18} {MODELS.get(name).description}")


@app.command()
def datasets() -> None:
    """List the registered datasets."""
    from dst.datasets import DATASETS

    for name in DATASETS:
        typer.echo(f"{name:<16} {DATASETS.get(name).description}")


@app.command()
def criteria() -> None:
    """List the pruning criteria and growth criteria."""
    from dst.criteria import CRITERIA
    from dst.growth import GROWTH

    for name in CRITERIA:
        typer.echo(f"{name:<14} {CRITERIA.get(name).description}")
    typer.echo("growth:")
    for name in GROWTH:
        typer.echo(f"  {name:<12} {GROWTH.get(name).description}")
