"""A record of each training run, and the guard that keeps `--resume` from continuing it under another recipe.

A run folder holds `recipe.resolved.toml` (the recipe as trained: file + overrides + defaults, loadable by
`load_recipe`, so a run can be repeated from its folder alone) and `run.json` (one entry per launch: what ran, where,
with which versions). Call `check_resume` before training, so that a changed recipe fails before any weight is
loaded, then `write_run_record` on rank 0.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from evev2 import jsonio
from evev2.train.recipe import Recipe, RecipeError, load_recipe

RESOLVED_RECIPE = "recipe.resolved.toml"
RUN_LOG = "run.json"

#: Fields whose changes `--resume` accepts: they change speed or bookkeeping, not the numbers a step computes.
#: Every other field (`train.steps` shapes the LR schedule; data sources, weights, lr, seeds...) must match.
NOT_TRAINING_RELEVANT: dict[str, str] = {
    "name": "a label for logs and plots",
    "output": "where the run is written, not what it computes",
    "checkpoint.*": "how often checkpoints are written and how many are kept",
    "train.log_every": "how often metrics are logged",
    "data.num_workers": "loader parallelism: the batches are the same for every value",
    "train.compile": "compiled kernels compute the same step faster",
    "train.activation_checkpointing": "recomputes activations in the backward pass: same gradients, less memory",
    "model.attn_implementation": "the attention kernel, not the attention",
}

_HEADER = ("# The fully resolved recipe of this run (file + overrides + defaults), written by `evev2 train`.\n"
           "# `--resume` compares against it; `evev2 train --recipe <this file>` trains the same stage again.\n")


class RecipeChangedError(RecipeError):
    """`--resume` with a recipe that would train differently from the one the run was started with."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_run_record(output: Path, recipe: Recipe, *, world_size: int, device: str | Any,
                     argv: list[str] | None = None) -> dict[str, Any]:
    """Write `output/recipe.resolved.toml` and append this launch to `output/run.json`; return the new entry.

    The resolved recipe is replaced by this launch's; the launch history is only ever appended to, and each entry
    keeps its own recipe, so a change forced through `--resume --force` stays on record.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = _without_unset(dataclasses.asdict(recipe))
    jsonio.write_text_atomic(output / RESOLVED_RECIPE, _HEADER + tomli_w.dumps(table))
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),  # the recipe's relative paths are relative to it
        "world_size": world_size,
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in ("evev2", "torch", "transformers")},
        "recipe": table,
    }
    log = output / RUN_LOG
    launches = jsonio.read_json(log)["launches"] if log.exists() else []
    jsonio.write_json(log, {"launches": [*launches, entry]})
    return entry


def _without_unset(table: dict[str, Any]) -> dict[str, Any]:
    """The table without its None fields (an absent section, `model.image_attention` left to the model): TOML has no
    null, and a field left out loads back as None."""
    return {k: _without_unset(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by field path, named as recipe errors name them (`data.sources[0].path`)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items()
                for k, v in _flatten(item, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _changes(old: Recipe, new: Recipe) -> list[str]:
    """`field: old -> new` for every training-relevant field that differs (`(unset)` where one side lacks it)."""
    before, after = _flatten(dataclasses.asdict(old)), _flatten(dataclasses.asdict(new))
    unset = object()
    changed = []
    for key in dict.fromkeys([*before, *after]):
        a, b = before.get(key, unset), after.get(key, unset)
        if a != b and not any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_TRAINING_RELEVANT):
            changed.append(f"{key}: {'(unset)' if a is unset else repr(a)} -> {'(unset)' if b is unset else repr(b)}")
    return changed


def check_resume(output: Path, recipe: Recipe, force: bool = False) -> None:
    """Refuse to continue a run whose recorded recipe differs from `recipe` in a training-relevant field.

    A silently changed recipe would give a run that matches neither recipe. Raises `RecipeChangedError` naming each
    change; with `force` it logs them as a warning instead. A folder without a record passes.
    """
    path = Path(output) / RESOLVED_RECIPE
    if not path.exists():
        return
    try:
        changes = _changes(load_recipe(path), recipe)
    except RecipeError as err:  # recorded by an evev2 whose recipe fields differ
        changes = [f"the recorded recipe no longer loads ({err})"]
    if not changes:
        return
    listed = "; ".join(changes)
    if force:
        logging.getLogger(__name__).warning("resuming %s with a changed recipe (--force): %s", output, listed)
        return
    raise RecipeChangedError(f"{output} was started with a different recipe ({path}); changed: {listed}. "
                             f"Pass --force to resume anyway, or train into a new --output.")
