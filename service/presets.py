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
import reprlib
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
    """Preset ``name``'s study with ``overrides`` applied (:func:`override_study`);
    ``KeyError`` for an unknown preset, ``ValueError`` for an override that cannot apply."""
    return override_study(copy.deepcopy(presets()[name].study), overrides or {})


def override_study(study: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``study`` (changed in place, and returned) with ``overrides`` (dotted path -> value)
    applied. In the sections whose keys contain dots themselves (:data:`WHOLE_KEYS`: ``grid``,
    ``tags``) the rest of the path is one key, dots included: ``grid.sparsity.density`` sets
    the grid's ``sparsity.density`` list, replacing the entry for that field however the study
    spells it (``density``), which the API would otherwise refuse as a field given twice.
    ``ValueError`` for an override that names no section, or a key in a section an earlier
    override replaced with a plain value."""
    from dst.spec import set_path  # (the spec module imports the registries: PyTorch)
    from service.study import canonical_path

    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in WHOLE_KEYS or not key:
            set_path(study, dotted, value)
            continue
        entries = _whole_key_section(study, section, dotted)
        if section == "grid":
            field = canonical_path(key)
            key = next((k for k in entries if canonical_path(k) == field), key)
        entries[key] = value
    return study


def _whole_key_section(study: dict[str, Any], section: str, dotted: str) -> dict[str, Any]:
    """``study[section]`` (made if missing) for override ``dotted`` to set a key in;
    ``ValueError`` naming the override if the section is a value that holds no keys (the
    file left it empty, or an earlier override set it: ``{"grid": 5, "grid.seed": [0]}``)."""
    found = study.setdefault(section, {})
    if not isinstance(found, dict):
        raise ValueError(
            f"cannot set {dotted!r}: {section!r} is not a section but {reprlib.repr(found)}; "
            f"give {section!r} as a mapping"
        )
    return found


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key.path=value`` strings (values parsed as YAML: ``0.05``, ``[0, 1]``, ``snip``)."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key.path=value")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides
