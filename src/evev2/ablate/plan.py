"""How big the ablation is: the world and stage-0 LLM (a demo plan), the shared stage 1, stage 2 and the shared SFT.

Every variant gets the same stage-2 steps on the same samples in the same order, hence the same training tokens, and
then the same SFT steps on the same samples (the paper's protocol: VQA is measured after a shared SFT stage, since a
variant whose LLM stayed frozen in stage 2 cannot answer questions yet). Seeds run side by side, one process each (see
`run_ablation`). The full plan with `--seeds 2` took 28.0 minutes on 2 CPU cores before stage 2 opened with the
reading warm-up (measured 2026-12-02), and with it 29.1 minutes on an AMD EPYC VM, within the 30-minute budget, and
32.8 and 31.7 minutes on slower VMs and hours (142-172 s for world, stage 0 and both stage 1s; then per variant, both
seeds at once on one core each, 142-196 s of stage 2 (190 steps), 13-19 s of caption loss and perplexity, 94-115 s of
SFT (70 steps) and 52-65 s of evaluation; README). With the samples prepared in the training process and the world
written in two threads it took 24.0 minutes on that AMD VM, and with the relation choice in the SFT mix and scored
by likelihood 25.0 minutes there in a slower hour (README). `--quick` is the half-minute version the tests run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evev2.demo.plan import FULL_PLAN, QUICK_PLAN, DemoPlan

#: The variants in the order of the paper's Figure 5, then v2.0 with bidirectional attention inside each image.
ABLATION_VARIANTS = ("v1.0", "v1.2", "v1.5", "v2.0", "v2.0-bidir")


@dataclass(frozen=True)
class AblationPlan:
    world: DemoPlan  # world and stage-0 LLM sizes; its `stages` are not used (the ablation runs its own)
    stage1_steps: int  # tiny/stage1.toml, trained once per image attention (variants of one compute the same function)
    stage2_steps: int  # tiny/stage2_2.toml, once per variant and seed, variant-specific trainable groups
    sft_steps: int  # tiny/stage3.toml, once per variant and seed, the whole model
    stage1_overrides: tuple[str, ...] = ()
    stage2_overrides: tuple[str, ...] = ()
    sft_overrides: tuple[str, ...] = ()
    caption_bleu_images: int = 25  # held-out images whose greedy caption is scored (BLEU-4); the loss uses them all
    eval_batch_size: int = 64


FULL_ABLATION = AblationPlan(world=FULL_PLAN, stage1_steps=40, stage2_steps=190, sft_steps=70)

# Single-object scenes at 96 px everywhere, a 24-image held-out split: seconds per variant.
_QUICK_DATA = ('data.sources=[{ name = "level1-qa", type = "llava", path = "$output/world/level1/train.json" }]',
               "data.max_size=96", "train.global_batch=8")
QUICK_ABLATION = AblationPlan(
    world=dataclasses.replace(QUICK_PLAN, train_images={1: 300}, heldout_images=24, llm_steps=15, stages=()),
    stage1_steps=4,
    stage2_steps=5,
    sft_steps=3,
    stage1_overrides=("data.max_size=96",),
    stage2_overrides=_QUICK_DATA,
    sft_overrides=_QUICK_DATA,
    caption_bleu_images=4,
)
