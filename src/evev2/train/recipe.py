"""Stage recipes: one TOML file per stage, validated on load into typed dataclasses.

Precedence: `key=value` overrides on the command line > the TOML file > the dataclass defaults. Every error names the
offending field (`data.sources[0].path`), so a malformed recipe fails before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evev2.errors import UserError

from evev2.data.datasets import check_spans
from evev2.data.image_processing import ResizePolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The shipped recipes: the repository's `recipes/` folder, installed as this package (see pyproject.toml).
RECIPE_PACKAGE = "evev2.recipes"

#: Trainable parameter groups, selected by role (see `evev2.train.groups`).
GROUPS = ("patch_embed", "vision", "text", "embeddings")
#: The roles whose linear layers can get LoRA adapters instead of being trained fully.
LORA_GROUPS = ("text", "vision")


class RecipeError(UserError, ValueError):
    """A recipe field is missing, unknown or of the wrong type; the message names the field."""


@dataclass
class SourceSpec:
    """One data source. `llava`: a JSON/JSONL list (or index mode); `webdataset`: tar shards."""

    name: str
    type: Literal["llava", "webdataset"]
    path: str  # JSON/JSONL file, or a glob of .tar shards
    weight: float = 1.0  # mixture weight, e.g. synthetic:language-only:web = 1:1:1
    # the part of the stage in which it is drawn, [start, end) as fractions of train.steps: [0.0, 0.25] is a warm-up on
    # this source alone if every other source spans [0.25, 1.0]; [0.9, 1.0] anneals on it
    span: list[float] = field(default_factory=lambda: [0.0, 1.0])
    image_root: str = ""  # folder that image paths are relative to (default: the JSON file's folder)
    json_root: str = ""  # index mode: folder of the per-sample JSON files (default: the index file's folder)


@dataclass
class ModelSpec:
    source: str  # a converted LLM folder or the previous stage's export
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # auto: FlexAttention with a block-causal (packed) mask on GPU, SDPA with a boolean block mask on CPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"
    # how image tokens attend (`EVEConfig.image_attention`), set on the model when it is loaded and kept in its export;
    # unset: as the source's config says
    image_attention: Literal["causal", "bidirectional"] | None = None


@dataclass
class DataSpec:
    sources: list[SourceSpec]
    template: Literal["plain", "eve", "chatml"] = "plain"
    max_size: int = 800  # image resize bound (pixels), see resize_policy
    resize_policy: ResizePolicy = "max_area"
    token_budget: int = 2048  # max spliced tokens per packed row (the stage's max length)
    max_bad_fraction: float = 0.05  # skipped / seen above this stops the run ...
    guard_min_samples: int = 200  # ... once this many records have been seen
    seed: int = 0
    # DataLoader worker processes that read, decode, tokenize and pack whole steps ahead of the GPU; 0 = in the
    # training process. auto: min(8, CPU cores per rank) on GPU, 2 on CPU. The data is the same for every value.
    num_workers: int | Literal["auto"] = "auto"


@dataclass
class OptimSpec:
    lr: float  # peak learning rate
    group_lr: dict[str, float] = field(default_factory=dict)  # per-group overrides, e.g. {patch_embed = 6e-4}
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class TrainSpec:
    trainable: list[str]  # groups from GROUPS
    steps: int  # optimiser steps of this stage
    global_batch: int  # samples per optimiser step, summed over ranks
    micro_batch_rows: int = 4  # packed rows per forward/backward
    activation_checkpointing: bool = False
    compile: bool | Literal["auto"] = "auto"  # torch.compile every decoder layer; auto: on for CUDA, off for CPU
    seed: int = 0
    log_every: int = 1


@dataclass
class LoraSpec:
    """LoRA adapters (PEFT) on every linear layer of the decoder roles in `groups`, whose weights stay frozen;
    `train.trainable` may still train other groups fully (e.g. the patch embedding)."""

    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the adapters' input
    groups: list[str] = field(default_factory=lambda: list(LORA_GROUPS))
    # merged: adapters folded into a plain EVEv2 folder; adapters: a PEFT adapter folder (`PeftModel.from_pretrained`
    # on the base model, with the fully trained groups in it as `modules_to_save`)
    export: Literal["merged", "adapters"] = "merged"

    def validate(self, trainable: list[str]) -> None:
        bad = [g for g in self.groups if g not in LORA_GROUPS]
        if bad or not self.groups:
            raise RecipeError(f"lora.groups: unknown or empty groups {bad}; choose from {list(LORA_GROUPS)}")
        if both := sorted(set(self.groups) & set(trainable)):
            raise RecipeError(f"lora.groups and train.trainable both name {both}: a group gets adapters or is trained "
                              "fully, not both")
        if self.export == "adapters" and (full := sorted(set(trainable) & set(LORA_GROUPS))):
            raise RecipeError(f"lora.export = \"adapters\" with train.trainable {full}: an adapter folder holds "
                              "adapters and small fully trained modules (patch_embed, embeddings); export \"merged\" "
                              "instead")
        if self.rank <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise RecipeError(f"lora: rank and alpha must be positive and dropout in [0, 1), got rank {self.rank}, "
                              f"alpha {self.alpha}, dropout {self.dropout}")


@dataclass
class CheckpointSpec:
    every: int = 0  # steps between checkpoints; 0 = only at the end / on SIGTERM
    keep_last: int = 2


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec
    train: TrainSpec
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    lora: LoraSpec | None = None
    output: str = "runs/out"

    def validate(self) -> Recipe:
        bad = [g for g in self.train.trainable if g not in GROUPS]
        if bad or not (self.train.trainable or self.lora):
            raise RecipeError(f"train.trainable: unknown or empty groups {bad}; choose from {list(GROUPS)}")
        lr_groups = [*GROUPS, "lora"] if self.lora else list(GROUPS)
        if unknown := set(self.optim.group_lr) - set(lr_groups):
            raise RecipeError(f"optim.group_lr: unknown groups {sorted(unknown)}; choose from {lr_groups}")
        if self.lora:
            self.lora.validate(self.train.trainable)
        for name, value in (("train.steps", self.train.steps), ("train.global_batch", self.train.global_batch),
                            ("train.micro_batch_rows", self.train.micro_batch_rows),
                            ("data.token_budget", self.data.token_budget), ("optim.lr", self.optim.lr)):
            if value <= 0:
                raise RecipeError(f"{name} must be positive, got {value}")
        if self.data.num_workers != "auto" and self.data.num_workers < 0:
            raise RecipeError(f"data.num_workers must be >= 0 or \"auto\", got {self.data.num_workers}")
        if not 0 <= self.optim.warmup_ratio < 1:
            raise RecipeError(f"optim.warmup_ratio must be in [0, 1), got {self.optim.warmup_ratio}")
        if not self.data.sources:
            raise RecipeError("data.sources: at least one source is required")
        try:
            check_spans([source.span for source in self.data.sources], self.train.steps)
        except ValueError as err:
            raise RecipeError(f"data.sources[].span: {err}") from None
        return self


def _build(cls: type, value: Any, where: str) -> Any:
    """Recursively turn TOML values into the dataclass `cls`, checking names and types."""
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin in (typing.Union, types.UnionType):  # e.g. `int | Literal["auto"]`: the first arm that accepts it
        if len(arms := [arm for arm in args if arm is not type(None)]) == 1:  # `X | None`: TOML has no null, so X
            return _build(arms[0], value, where)
        for arm in args:
            try:
                return _build(arm, value, where)
            except RecipeError:
                continue
        names = " or ".join(repr(a) if not isinstance(a, type) else a.__name__ for arm in args
                            for a in (typing.get_args(arm) if typing.get_origin(arm) is Literal else (arm,)))
        raise RecipeError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise RecipeError(f"{where or 'recipe'}: expected a table, got {type(value).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if unknown := set(value) - set(fields):
            raise RecipeError(f"{where + '.' if where else ''}{sorted(unknown)[0]}: unknown field "
                              f"(known: {', '.join(fields)})")
        kwargs = {}
        for name, f in fields.items():
            path = f"{where}.{name}" if where else name
            if name in value:
                kwargs[name] = _build(hints[name], value[name], path)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{path}: required field is missing")
        return cls(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a table, got {type(value).__name__}")
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, cls) or (cls is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {cls.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> None:
    """Apply `a.b.c=value` overrides in place; values are TOML literals, bare words are strings."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = table
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part} is not a table")
        node[leaf] = value


def shipped_recipes() -> Path:
    """The folder of the recipes shipped with evev2 (`tiny/`, `paper/`): the repository's `recipes/` under an editable
    install, `evev2/recipes/` in site-packages under a regular one."""
    try:
        root = importlib.resources.files(RECIPE_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"the shipped recipes ({RECIPE_PACKAGE}) are not installed: install evev2 with pip "
                                "(`pip install -e .` in the repository), or name a recipe file or folder") from err
    return Path(str(root))


def shipped_recipe_names() -> list[str]:
    """Every shipped recipe by its name, e.g. `tiny/stage1` for `recipes/tiny/stage1.toml`."""
    root = shipped_recipes()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.toml"))


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file: `recipe` itself when it exists or ends in a suffix (`.toml`), else the shipped recipe of that
    name (`tiny/stage1` -> the installed `recipes/tiny/stage1.toml`)."""
    path = Path(recipe)
    if path.exists() or path.suffix:
        return path
    shipped = shipped_recipes() / f"{path.as_posix()}.toml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"recipe {recipe} not found: no such file, nor a shipped recipe of that name "
                            f"({', '.join(shipped_recipe_names())})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, type-check and validate a recipe: a TOML file, or a shipped recipe's name (`tiny/stage1`, see
    `find_recipe`). Relative paths in it are relative to the current folder."""
    path = find_recipe(path)
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from err
    apply_overrides(table, overrides or [])
    try:
        return _build(Recipe, table, "").validate()
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
