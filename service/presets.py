"""The paper's experiments as named studies (presets), one YAML study each in
``examples/presets/`` (used by the API process and the CLI).

A preset is a study like any other: ``preset_study(name, overrides)`` reads it, applies
``key.path=value`` overrides (``grid.<field>`` names one grid field whole, dots included:
``grid.sparsity.density``) and returns plain study data, which the caller validates as a
:class:`~service.study.StudySpec`. The file's leading comment is its description.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PRESETS_DIR = Path(__file__).resolve().parents[1] / "examples" / "presets"
WHOLE_KEYS = ("grid", "tags")  # sections whose keys may themselves contain dots


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    study: dict[str, Any]


@functools.cache
def presets() -> dict[str, Preset]:
    """Every preset by name, in name order."""
    found = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        text = path.read_text()
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").rstrip())
        found[path.stem] = Preset(path.stem, " ".join(comment), yaml.safe_load(text))
    return found


def preset_study(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Preset ``name``'s study with ``overrides`` (dotted path -> value) applied;
    ``KeyError`` for an unknown preset, ``ValueError`` for an override that names no section."""
    from dst.spec import set_path  # (the spec module imports the registries: PyTorch)

    study = copy.deepcopy(presets()[name].study)
    for dotted, value in (overrides or {}).items():
        section, _, rest = dotted.partition(".")
        if section in WHOLE_KEYS and rest:
            study.setdefault(section, {})[rest] = value
        else:
            set_path(study, dotted, value)
    return study


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key.path=value`` strings (values parsed as YAML: ``0.05``, ``[0, 1]``, ``snip``)."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key.path=value")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides
