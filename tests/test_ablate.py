"""`evev2 ablate --quick`: five variants (the paper's four and v2.0 with bidirectional image attention) from one stage-0
LLM, stage 2 then a shared SFT on the same tokens, their numbers, table, verdicts and plot.

One quick run is shared by every test (about half a minute on 2 cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evev2.ablate.pipeline import run_ablation
from evev2.ablate.plan import ABLATION_VARIANTS, QUICK_ABLATION
from evev2.ablate.report import ablation_table, bidirectional_verdict, summarize, verdict
from evev2.ablate.variants import derive_variant, image_attention, parameter_counts, sft_trainable
from evev2.cli import main as cli
from evev2.model import EVEForCausalLM
from evev2.train.groups import freeze_except, parameter_groups

pytestmark = pytest.mark.slow  # the quick ablation


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> tuple[Path, dict, dict]:
    output = tmp_path_factory.mktemp("ablate")
    results = cli(["ablate", "--quick", "--output", str(output)])
    return output, json.loads((output / "ablation.json").read_text()), results


def test_quick_ablation_writes_json_and_plot(ablation):
    output, saved, returned = ablation
    assert (output / "ablation_loss.png").stat().st_size > 10_000
    assert saved["verdict"] == returned["verdict"]
    assert saved["bidirectional"]["outcome"] in ("HELPS", "HURTS", "MIXED")
    assert [run["variant"] for run in saved["runs"]] == list(ABLATION_VARIANTS)
    assert len(saved["machine"]["load_average_at_end"]) == 3 and saved["timing"]["total_s"] > 0
    for run in saved["runs"]:  # SFT starts from the variant's own stage-2 export
        folder = output / "runs" / f"{run['variant']}-seed0"
        assert run["models"] == {"stage2": str(folder / "stage2" / "export"), "sft": str(folder / "sft" / "export")}


def test_every_variant_trains_the_same_tokens_and_only_its_groups(ablation):
    output, saved, _ = ablation
    for stage, steps in (("stage2", saved["plan"]["stage2_steps"]), ("sft", saved["plan"]["sft_steps"])):
        tokens = {run["variant"]: run["tokens"][stage] for run in saved["runs"]}
        assert len({json.dumps(t, sort_keys=True) for t in tokens.values()}) == 1  # identical steps and token counts
        assert tokens["v1.0"]["tokens"] > tokens["v1.0"]["supervised_tokens"] > 0
        assert tokens["v1.0"]["steps"] == steps
        for run in saved["runs"]:  # the metrics.jsonl on disk says the same
            rows = [json.loads(line) for line in (output / "runs" / f"{run['variant']}-seed0" / stage /
                                                   "metrics.jsonl").read_text().splitlines()]
            assert sum(r["tokens"] for r in rows) == run["tokens"][stage]["tokens"]
    trainable = {run["variant"]: run["trainable"] for run in saved["runs"]}
    assert trainable["v1.0"] == {"stage2": ["patch_embed", "text", "embeddings"],
                                 "sft": ["patch_embed", "text", "embeddings"]}  # v1.0 has no vision group
    for variant in ("v1.2", "v1.5", "v2.0", "v2.0-bidir"):
        assert trainable[variant] == {"stage2": ["patch_embed", "vision"],
                                      "sft": ["patch_embed", "vision", "text", "embeddings"]}


def test_frozen_llm_variants_keep_the_stage0_language_until_sft(ablation):
    _, saved, _ = ablation
    before = saved["text_perplexity_before"]
    stage2 = {v: s["perplexity_stage2"]["mean"] for v, s in saved["summary"].items()}
    sft = {v: s["perplexity_sft"]["mean"] for v, s in saved["summary"].items()}
    assert all(math.isfinite(p) and p > 1 for p in [before, *stage2.values(), *sft.values()])
    for variant in ("v1.2", "v1.5", "v2.0", "v2.0-bidir"):  # text tokens only see the frozen text weights in stage 2
        assert stage2[variant] == pytest.approx(before, rel=1e-4)
    assert stage2["v1.0"] != pytest.approx(before, rel=1e-4)  # v1.0 trained its LLM in stage 2
    for variant in ABLATION_VARIANTS:  # SFT trains every variant's LLM
        assert sft[variant] != pytest.approx(stage2[variant], rel=1e-4)


def test_table_and_parameter_counts(ablation):
    _, saved, returned = ablation
    table = ablation_table(returned)
    head = table.splitlines()[0]
    for column in ("stage-2 caption loss", "text ppl after stage 2", "overall", "blind overall", "caption BLEU-4",
                   "text ppl after SFT", "params total", "stage-2 tokens", "SFT tokens", "stage-2 / SFT train s"):
        assert f"| {column} |" in head
    for variant in ABLATION_VARIANTS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {variant} |"))
        assert f"| {saved['variants'][variant]['tokens']['sft']['tokens']:,} |" in row
        assert row.count("|") == head.count("|")
    chance = table.splitlines()[-1].split("|")
    assert chance[1].strip() == "chance" and chance[head.split("|").index(" color ")].strip() == \
        f"{saved['chance']['color']:.3f}"
    p = {v: saved["variants"][v]["parameters"] for v in ABLATION_VARIANTS}
    assert p["v2.0"]["total"] > p["v1.5"]["total"] > p["v1.0"]["total"]
    assert p["v1.2"]["total"] > p["v1.0"]["total"]
    assert {p[v]["active_text_token"] for v in ABLATION_VARIANTS} == {p["v1.0"]["active_text_token"]}
    assert p["v1.5"]["active_vision_token"] == p["v2.0"]["active_vision_token"] == p["v1.0"]["active_vision_token"]
    assert p["v2.0-bidir"] == p["v2.0"]  # the same weights, attending differently
    assert p["v1.2"]["active_vision_token"] > p["v1.0"]["active_vision_token"]
    for stats in saved["summary"].values():
        assert 0 <= stats["overall"]["mean"] <= 1 and math.isfinite(stats["caption_loss"]["mean"])
        assert stats["caption_loss"]["mean"] > 0


def test_seeds_run_in_parallel_processes_with_the_cores_split(ablation, tmp_path):
    """Two seeds on two threads: one worker process per seed; seed 0 trains on exactly the tokens of the
    single-seed run, seed 1 on another sample order, and every variant is summarised over both."""
    _, single, _ = ablation
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_ablation(tmp_path, QUICK_ABLATION, seeds=2)
    finally:
        torch.set_num_threads(threads)
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [
        (variant, seed) for seed in (0, 1) for variant in ABLATION_VARIANTS]
    tokens = {(r["variant"], r["seed"]): r["tokens"] for r in results["runs"]}
    for run in single["runs"]:
        assert tokens[run["variant"], 0] == run["tokens"]
        assert tokens[run["variant"], 1] != run["tokens"]
    assert all(s["caption_loss"]["n"] == 2 for s in results["summary"].values())
    assert {f"{v}-seed{seed} sft" for v in ABLATION_VARIANTS for seed in (0, 1)} <= set(results["timing"]["phases"])


def test_derived_variants_equal_their_stage1_model(ablation, tmp_path):
    """Each variant starts as the stage-1 model of its image attention; v2.0-bidir's stage 1 attended both ways."""
    output, saved, _ = ablation
    assert saved["stage1"] == {attention: str(output / folder / "export") for attention, folder in
                               (("causal", "stage1"), ("bidirectional", "stage1-bidirectional"))}
    assert saved["stage1_tokens"]["causal"] == saved["stage1_tokens"]["bidirectional"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    ids[:, 1] = -200
    images = [torch.randn(3, 64, 96, generator=g, dtype=torch.float64), torch.randn(3, 32, 64, generator=g,
                                                                                    dtype=torch.float64)]
    stage1 = {attention: EVEForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
              for attention, path in saved["stage1"].items()}
    assert stage1["bidirectional"].config.image_attention == "bidirectional"
    for variant in ABLATION_VARIANTS:
        attention = image_attention(variant)
        expected = stage1[attention](input_ids=ids, images=images).logits
        model = EVEForCausalLM.from_pretrained(derive_variant(Path(saved["stage1"][attention]), tmp_path / variant,
                                                              variant, seed=3), dtype=torch.float64).eval()
        torch.testing.assert_close(model(input_ids=ids, images=images).logits, expected, rtol=0, atol=1e-9)
        counts = parameter_counts(model)
        vision = sum(p.numel() for _, p in parameter_groups(model)["vision"])
        assert counts["total"] == sum(p.numel() for p in model.parameters()) and (vision > 0) == (variant != "v1.0")
        freeze_except(model, list(sft_trainable(variant)))  # SFT trains the whole model, v1.0 included
        assert all(p.requires_grad for p in model.parameters())


def _run(variant: str, overall: float, caption: float, ppl: float, ppl_sft: float = 4.0) -> dict:
    metrics = {"color": overall, "shape": overall, "count": overall, "relation": overall, "relation_choice": overall,
               "text": overall, "overall": overall, "blind_overall": 0.2, "caption_loss": caption,
               "caption_bleu4": 1.0, "perplexity_stage2": ppl, "perplexity_sft": ppl_sft, "stage2_s": 1.0, "sft_s": 1.0,
               "eval_s": 1.0}
    return {"variant": variant, "metrics": metrics}


def test_verdict_is_computed_from_the_numbers():
    agree = [_run("v1.0", 0.4, 1.0, 9.0, 5.0), _run("v1.5", 0.5, 0.9, 3.0, 3.5), _run("v2.0", 0.6, 0.8, 3.0, 3.9),
             _run("v2.0", 0.62, 0.8, 3.0, 3.9)]
    result = verdict(summarize(agree))
    assert result["agrees_with_paper"] and result["vision_best"] and "AGREES" in result["lines"][-1]
    assert "tied with v1.5" in result["lines"][2] and "v2.0 best" in result["lines"][0]
    assert result["perplexity_sft_order"] == ["v1.5", "v2.0", "v1.0"] and "ranks 2 of 3" in result["lines"][3]
    assert summarize(agree)["v2.0"]["overall"]["n"] == 2
    # v2.0 against each other variant: which way, and whether beyond the seed spread (one seed each here: never)
    assert result["against"]["v1.5"] == {"lower_caption_loss": True, "caption_loss_beyond_spread": None,
                                         "higher_accuracy": True, "accuracy_beyond_spread": None}
    assert "v2.0 vs v1.0: stage-2 caption loss 0.8000 vs 1.0000 (lower, one seed" in "\n".join(result["lines"])
    two = summarize([_run("v1.2", 0.5, 0.90, 3.0), _run("v1.2", 0.6, 0.92, 3.0),
                     _run("v2.0", 0.52, 0.80, 3.0), _run("v2.0", 0.62, 0.81, 3.0)])
    pair = verdict(two)["against"]["v1.2"]  # caption loss 0.105 apart, spreads 0.014: beyond; VQA 0.02 vs 0.07: within
    assert pair == {"lower_caption_loss": True, "caption_loss_beyond_spread": True, "higher_accuracy": True,
                    "accuracy_beyond_spread": False}
    assert "(lower, beyond the seed spread)" in verdict(two)["lines"][4]
    assert "(higher, within the seed spread)" in verdict(two)["lines"][4]
    # best post-SFT VQA but not the lowest stage-2 caption loss: vision is not best, and the caption part says why
    caption_lost = [_run("v1.0", 0.4, 0.7, 9.0), _run("v1.5", 0.5, 0.9, 3.0), _run("v2.0", 0.6, 0.8, 3.0)]
    result = verdict(summarize(caption_lost))
    assert result["checks"]["vision_best_accuracy"] and not result["checks"]["vision_best_caption_loss"]
    assert not result["vision_best"] and not result["agrees_with_paper"]
    assert "v2.0 NOT best" in result["lines"][0] and "v2.0 best" in result["lines"][1]
    assert "DISAGREES" in result["lines"][-1] and "vision_best_caption_loss" in result["lines"][-1]
    # lowest caption loss but not the best VQA, and worse language than a tie allows
    vqa_lost = [_run("v1.0", 0.7, 1.0, 9.0), _run("v1.5", 0.5, 0.9, 3.0), _run("v2.0", 0.6, 0.8, 3.01)]
    result = verdict(summarize(vqa_lost))
    assert result["checks"] == {"vision_best_caption_loss": True, "vision_best_accuracy": False,
                                "language_kept_best": False}
    assert "vision_best_accuracy, language_kept_best failed" in result["lines"][-1]
    # v2.0-bidir is no part of the paper's claim, even when it beats v2.0; it gets a verdict of its own
    with_bidir = agree + [_run("v2.0-bidir", 0.7, 0.7, 3.0, 3.8)]
    assert verdict(summarize(with_bidir)) == verdict(summarize(agree))
    bidir = bidirectional_verdict(summarize(with_bidir))
    assert bidir["outcome"] == "HELPS" and "0.7000 vs 0.8000" in bidir["lines"][0]
    assert "0.700 vs 0.610" in bidir["lines"][0]
    assert bidirectional_verdict(summarize(agree + [_run("v2.0-bidir", 0.7, 0.9, 3.0)]))["outcome"] == "MIXED"
    assert bidirectional_verdict(summarize(agree + [_run("v2.0-bidir", 0.5, 0.9, 3.0)]))["outcome"] == "HURTS"
    assert bidirectional_verdict(summarize(agree))["lines"] == []
    # two seeds each: a difference counts only beyond the larger spread; one seed never does
    assert not bidir["beyond_spread"] and "one seed" in bidir["lines"][0]
    two_seeds = agree + [_run("v2.0-bidir", 0.7, 0.7, 3.0), _run("v2.0-bidir", 0.7, 0.7, 3.0)]
    clear = bidirectional_verdict(summarize(two_seeds))
    assert clear["beyond_spread"] and "beyond the seed spread" in clear["lines"][0]
    noisy = agree + [_run("v2.0-bidir", 0.3, 0.9, 3.0), _run("v2.0-bidir", 1.1, 0.5, 3.0)]
    unclear = bidirectional_verdict(summarize(noisy))
    assert unclear["outcome"] == "HELPS" and not unclear["beyond_spread"]
    assert "within the seed spread" in unclear["lines"][0]
