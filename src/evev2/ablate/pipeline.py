"""`evev2 ablate`: world -> stage-0 LLM -> stage 1 (once per image attention) -> per variant and seed: stage 2 ->
caption loss and text perplexity -> shared SFT -> held-out VQA, BLEU-4 and text perplexity.

The paper's protocol (EVEv2 Table 3 / Figure 5): stage 2 trains what differs between the variants (`stage2_trainable`:
the LLM for v1.0, patch embedding + vision weights with the LLM frozen for the others); then one SFT stage, the same
for all, trains the whole model on instruction data, and only then is VQA measured. The world, the stage-0 LLM and the
recipes are the demo's (`build_world`, `build_llm`, `recipes/tiny/stage1.toml`, `stage2_2.toml`, `stage3.toml`), run
through the same `Trainer`. Within a stage, data, order, steps and schedule are identical for every variant, so every
variant sees the same tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import platform
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from evev2 import jsonio
from evev2.ablate.measure import caption_loss, run_tokens
from evev2.ablate.plan import ABLATION_VARIANTS, FULL_ABLATION, QUICK_ABLATION, AblationPlan
from evev2.ablate.report import ablation_table, bidirectional_verdict, plot_ablation_curves, summarize, verdict
from evev2.ablate.variants import derive_variant, image_attention, parameter_counts, sft_trainable, stage2_trainable
from evev2.synth.language import QA_TYPES
from evev2.demo.evaluate import evaluate_heldout, split_question_file
from evev2.demo.language import text_perplexity
from evev2.demo.pipeline import PhaseClock, build_llm, build_world, nonblank_lines, recipe_folder, stage_overrides
from evev2.infer.engine import InferenceEngine
from evev2.model.convert import convert_llm
from evev2.train.engine import Trainer
from evev2.train.recipe import load_recipe

log = logging.getLogger(__name__)

OWNED = ("world", "stage0", "stage1", "stage1-bidirectional", "runs", "eval")


def _train(recipe_file: Path, output: Path, steps: int, overrides: tuple[str, ...]) -> tuple[Path, Path]:
    """One stage through the demo's recipe rebasing and the training engine; returns (export, metrics.jsonl)."""
    recipe = load_recipe(recipe_file, stage_overrides(recipe_file, output, steps, overrides))
    export = Trainer(recipe, recipe.output).train()
    if export is None:
        raise SystemExit(f"{recipe.name} stopped before its last step (SIGTERM); its checkpoint is in {recipe.output}")
    return export, Path(recipe.output) / "metrics.jsonl"


def _language_and_captions(export: Path, files: dict[str, Any]) -> dict[str, Any]:
    """After stage 2: teacher-forced held-out caption loss (how well vision was learned) and text-only perplexity
    (how much language stage 2 kept). Neither needs the model to answer questions, so both are fair before SFT."""
    engine = InferenceEngine.from_pretrained(export)
    captions = caption_loss(engine.model, engine.processor, files["caption_records"], files["root"])
    return {"caption_loss": captions,
            "text_perplexity": text_perplexity(engine.model, engine.tokenizer, files["text"])}


def _evaluate(export: Path, files: dict[str, Any], out: Path, plan: AblationPlan) -> dict[str, Any]:
    """After SFT: held-out VQA (model and blind), caption BLEU-4, text perplexity and parameter counts of one model."""
    engine = InferenceEngine.from_pretrained(export)
    heldout = evaluate_heldout(engine, files["qa"], files["captions"], files["root"], out, plan.eval_batch_size)
    model, blind = heldout["model"], heldout["blind"]
    metrics = {kind: model[f"{kind}/accuracy"] / 100 for kind in QA_TYPES if f"{kind}/accuracy" in model}
    metrics.update(overall=model["accuracy"] / 100, blind_overall=blind["accuracy"] / 100,
                   caption_bleu4=heldout["captions"]["caption/bleu4"],
                   perplexity_sft=text_perplexity(engine.model, engine.tokenizer, files["text"]))
    return {"metrics": metrics, "heldout": heldout, "parameters": parameter_counts(engine.model)}


def _worker_setup(threads: int, log_level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_seed(seed: int, output: Path, plan: AblationPlan, recipes: Path, stage1: dict[str, Path],
              files: dict[str, Any]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], dict[str, float]]:
    """Every variant with one seed: (runs, each run's stage-2 metrics, wall time per phase)."""
    runs, curves, clock = [], [], PhaseClock(f"ablate seed {seed}")
    for variant in ABLATION_VARIANTS:
        name, folder = f"{variant}-seed{seed}", output / "runs" / f"{variant}-seed{seed}"
        trainable = {"stage2": list(stage2_trainable(variant)), "sft": list(sft_trainable(variant))}
        seeded = (f"train.seed={seed}", f"data.seed={seed}")
        derive_variant(stage1[image_attention(variant)], folder / "init", variant, seed)
        stage2, stage2_metrics = _train(
            recipes / "stage2_2.toml", output, plan.stage2_steps,
            (*plan.stage2_overrides, f"model.source={folder / 'init'}", f"output={folder / 'stage2'}",
             f"train.trainable={json.dumps(trainable['stage2'])}", *seeded))
        clock.lap(f"{name} stage2")
        after_stage2 = _language_and_captions(stage2, files)
        clock.lap(f"{name} stage2-eval")
        sft, sft_metrics = _train(
            recipes / "stage3.toml", output, plan.sft_steps,
            (*plan.sft_overrides, f"model.source={stage2}", f"output={folder / 'sft'}",
             f"train.trainable={json.dumps(trainable['sft'])}", *seeded))
        clock.lap(f"{name} sft")
        evaluated = _evaluate(sft, files, folder / "eval", plan)
        clock.lap(f"{name} eval")
        evaluated["metrics"].update(
            caption_loss=after_stage2["caption_loss"]["loss"], perplexity_stage2=after_stage2["text_perplexity"],
            stage2_s=clock.phases[f"{name} stage2"], sft_s=clock.phases[f"{name} sft"],
            eval_s=clock.phases[f"{name} stage2-eval"] + clock.phases[f"{name} eval"])
        runs.append({"variant": variant, "seed": seed, "trainable": trainable,
                     "tokens": {"stage2": run_tokens(stage2_metrics), "sft": run_tokens(sft_metrics)},
                     "models": {"stage2": str(stage2), "sft": str(sft)},
                     "stage2_caption_loss": after_stage2["caption_loss"], **evaluated})
        curves.append(stage2_metrics)
    return runs, curves, clock.phases


def run_ablation(output: Path, plan: AblationPlan, seeds: int = 1, recipes: Path | None = None) -> dict[str, Any]:
    """The whole study; returns what it writes to `output/ablation.json`."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    recipes = recipe_folder(recipes)
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    for name in OWNED:  # never mix a previous run's models or predictions into this one
        shutil.rmtree(output / name, ignore_errors=True)
    clock, load_at_start = PhaseClock("ablate"), os.getloadavg()
    folders = build_world(plan.world, output / "world")
    clock.lap("world")
    llm, perplexity_before = build_llm(plan.world, folders, output / "stage0")
    convert_llm(llm, output / "stage0" / "eve", variant="v1.0", patch_hidden_size=plan.world.patch_hidden_size)
    clock.lap("stage0")
    stage1, stage1_metrics = {}, {}  # by image attention: stage 1 trains the patch embedding for the one it will meet
    for attention in dict.fromkeys(image_attention(variant) for variant in ABLATION_VARIANTS):
        name = "stage1" if attention == "causal" else f"stage1-{attention}"
        stage1[attention], stage1_metrics[attention] = _train(
            recipes / "stage1.toml", output, plan.stage1_steps,
            (*plan.stage1_overrides, f"model.image_attention={attention}", f"output={output / name}"))
        clock.lap(name)

    questions = folders["heldout"] / "heldout_questions.jsonl"
    qa_file, caption_file = split_question_file(questions, output / "eval", plan.caption_bleu_images)
    files = {"qa": qa_file, "captions": caption_file, "root": folders["heldout"],
             "caption_records": [r for r in jsonio.read_jsonl(questions) if r["type"] == "caption"],
             "text": nonblank_lines(folders["heldout"] / "heldout_text.txt")}
    run_seed = functools.partial(_run_seed, output=output, plan=plan, recipes=recipes, stage1=stage1, files=files)
    jobs = min(seeds, torch.get_num_threads())
    if jobs == 1:
        per_seed = [run_seed(seed) for seed in range(seeds)]
    else:  # one process per seed, the cores split between them: a tiny model uses one core better than two
        threads = torch.get_num_threads() // jobs
        log.info("ablate: %d seeds in %d processes of %d thread(s)", seeds, jobs, threads)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup,
                                 initargs=(threads, logging.getLogger().level)) as pool:
            per_seed = list(pool.map(run_seed, range(seeds)))
    runs, variants, curves = [], {}, {v: [] for v in ABLATION_VARIANTS}
    for seed_runs, seed_curves, seed_phases in per_seed:
        runs += seed_runs
        clock.phases.update(seed_phases)
        for run, metrics in zip(seed_runs, seed_curves):
            curves[run["variant"]].append(metrics)
            variants.setdefault(run["variant"], {key: run[key] for key in ("parameters", "tokens", "trainable")})

    summary = summarize(runs)
    first = runs[0]["heldout"]["model"]
    results = {
        "summary": summary,
        "verdict": verdict(summary),
        "bidirectional": bidirectional_verdict(summary),
        "variants": variants,
        "chance": {kind: first[f"{kind}/chance"] / 100 for kind in QA_TYPES if f"{kind}/chance" in first},
        "text_perplexity_before": perplexity_before,
        "stage1": {attention: str(export) for attention, export in stage1.items()},
        "stage1_tokens": {attention: run_tokens(metrics) for attention, metrics in stage1_metrics.items()},
        "runs": runs,
        "plan": {"seeds": seeds, "stage1_steps": plan.stage1_steps, "stage2_steps": plan.stage2_steps,
                 "sft_steps": plan.sft_steps, "stage1_overrides": list(plan.stage1_overrides),
                 "stage2_overrides": list(plan.stage2_overrides), "sft_overrides": list(plan.sft_overrides),
                 "train_images": plan.world.train_images, "heldout_images": plan.world.heldout_images,
                 "llm": vars(plan.world.llm), "llm_steps": plan.world.llm_steps,
                 "stage1": "trained once per image attention on EVEv1.0, every variant derived from the one with its "
                           "image attention (derive_variant)",
                 "stage2": "recipes/tiny/stage2_2.toml, variant-specific trainable groups (Figure 5)",
                 "sft": "recipes/tiny/stage3.toml from each variant's stage-2 export, the whole model, same for all"},
        "files": {"loss_plot": str(plot_ablation_curves(curves, output / "ablation_loss.png"))},
        "machine": {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    # > threads means other jobs shared the CPU and the wall times are pessimistic
                    "load_average_at_start": list(load_at_start), "load_average_at_end": list(os.getloadavg())},
        "timing": clock.summary(),
    }
    (output / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def ablate_cli(output: Path = Path("runs/ablate"), quick: bool = False, seeds: int = 1,
               recipes: Path | None = None) -> dict[str, Any]:
    """Train EVEv1.0, v1.2, v1.5, v2.0 and v2.0 with bidirectional image attention from one stage-0 LLM on the same
    tokens and compare them.

    The paper's protocol in miniature: stage 2 with variant-specific trainable weights (Figure 5: its loss curves,
    held-out caption loss and text-only perplexity after it), then one shared SFT stage of the whole model, then
    held-out VQA accuracy per type (beside chance and a blind baseline), caption BLEU-4 and text perplexity. Also
    parameters total and active per token, tokens and wall time per stage. Writes ablation.json and
    ablation_loss.png, prints a markdown table, whether the result agrees with the paper's claim that v2.0 learns
    vision best and keeps language best, and whether bidirectional attention inside images helps v2.0.

    Args:
        output: run folder; its ablation subfolders are replaced.
        quick: the half-minute smoke version (tiny world, a few steps), as the tests run it.
        seeds: seeds per variant (data order of stage 2 and SFT, init of v1.2's dW); with more than one, mean ± std.
        recipes: folder with the demo's stage1.toml, stage2_2.toml and stage3.toml (default: the shipped recipes/tiny).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run_ablation(output, QUICK_ABLATION if quick else FULL_ABLATION, seeds, recipes)
    machine = results["machine"]
    print("\n" + ablation_table(results))
    print(f"\ntext-only perplexity before (stage-0 LLM): {results['text_perplexity_before']:.3f}")
    print("\n".join(results["verdict"]["lines"] + results["bidirectional"]["lines"]))
    print(f"\nwall time {results['timing']['total_s'] / 60:.1f} min on {machine['cpus']} CPUs, {machine['date_utc']}; "
          f"load averages at start {', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}, at end "
          f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_end'])}; files: {output}/ablation.json, "
          f"{results['files']['loss_plot']}")
    return results
