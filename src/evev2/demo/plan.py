"""How big each part of the demo is: world sizes, the stand-in LLM, steps per stage, and the time budget.

The full plan is sized for a 15-minute budget on a 2-core laptop CPU (README, "Time": 14.6-16.3 minutes on an AMD
EPYC VM, the hour deciding); `--minutes` scales every step count (and the training world with it) linearly against
that budget, and `--quick` is the few-minute smoke version the tests run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evev2.demo.language import LLMShape

CALIBRATED_MINUTES = 15.0


@dataclass(frozen=True)
class StagePlan:
    """One VLM stage: its recipe file (in the recipe folder) and what the demo overrides in it."""

    recipe: str  # file name, e.g. "stage1.toml"
    steps: int
    overrides: tuple[str, ...] = ()  # extra key=value recipe overrides (quick mode shrinks images here)


@dataclass(frozen=True)
class DemoPlan:
    train_images: dict[int, int]  # world level -> training images rendered
    heldout_images: int
    caption_eval_images: int  # held-out images whose greedy caption is scored (BLEU-4)
    llm: LLMShape
    llm_steps: int
    llm_batch_rows: int
    vocab_size: int
    patch_hidden_size: int
    variant: str
    stages: tuple[StagePlan, ...]
    eval_batch_size: int = 64
    contact_sheet_images: int = 8

    def scaled(self, minutes: float) -> DemoPlan:
        """The same plan with every step count and training-world size scaled by minutes / calibrated minutes."""
        factor = minutes / CALIBRATED_MINUTES
        if factor <= 0:
            raise ValueError(f"--minutes must be positive, got {minutes}")
        return dataclasses.replace(
            self,
            train_images={level: max(64, round(n * factor)) for level, n in self.train_images.items()},
            llm_steps=max(1, round(self.llm_steps * factor)),
            stages=tuple(dataclasses.replace(s, steps=max(1, round(s.steps * factor))) for s in self.stages),
        )


FULL_PLAN = DemoPlan(
    train_images={1: 6000, 2: 6000, 3: 12000},
    heldout_images=500,
    caption_eval_images=100,
    llm=LLMShape(),
    llm_steps=120,
    llm_batch_rows=16,
    vocab_size=600,
    patch_hidden_size=128,
    variant="v2.0",
    stages=(
        StagePlan("stage1.toml", steps=40),
        StagePlan("stage2_1.toml", steps=260),
        StagePlan("stage2_2.toml", steps=533),  # 134 steps of reading warm-up, then 399 of the mix
        StagePlan("stage3.toml", steps=420),
    ),
)

# About two minutes on 2 cores: the same decoder on a small world, short stages on small images. Its QA stage trains
# on single-object scenes' QA and colour questions with high vision learning rates, so that colour on the (full-world)
# held-out split leaves chance and the blind baseline behind, which is what the tests check (QA alone: 0.21, blind
# 0.10; with the colour questions: 0.43, blind 0.16).
QUICK_QA = ('data.sources=[{ name = "level1-qa", type = "llava", path = "$output/world/level1/train.json" }, '
            '{ name = "level1-colors", type = "llava", path = "$output/world/level1/train_colors.json" }]',
            "data.max_size=96", "optim.group_lr.patch_embed=1e-2", "optim.group_lr.vision=5e-3",
            "optim.group_lr.text=2e-3", "optim.group_lr.embeddings=2e-3", "train.global_batch=16",
            "train.micro_batch_rows=16")
QUICK_PLAN = DemoPlan(
    train_images={1: 2000, 2: 200, 3: 400},
    heldout_images=150,
    caption_eval_images=8,
    llm=LLMShape(),
    llm_steps=40,
    llm_batch_rows=16,
    vocab_size=600,
    patch_hidden_size=32,
    variant="v2.0",
    stages=(
        StagePlan("stage1.toml", steps=5),
        StagePlan("stage2_1.toml", steps=20, overrides=("data.max_size=96",)),
        StagePlan("stage2_2.toml", steps=300, overrides=QUICK_QA),
        StagePlan("stage3.toml", steps=10, overrides=("data.max_size=128",)),
    ),
    contact_sheet_images=4,
)
