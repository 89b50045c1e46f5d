"""The ablation's summary: mean and spread over seeds, the verdict on the paper's claim, table and Figure-5 plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from evev2.synth.language import QA_TYPES
from evev2 import jsonio

#: Per-run numbers averaged over seeds (accuracies are fractions; lower is better for loss and perplexity).
#: After stage 2: caption_loss, perplexity_stage2; after SFT: the VQA accuracies, caption_bleu4, perplexity_sft.
SUMMARY_METRICS = ("caption_loss", "perplexity_stage2", *QA_TYPES, "overall", "blind_overall", "caption_bleu4",
                   "perplexity_sft", "stage2_s", "sft_s", "eval_s")
#: Perplexities closer than this (relative) are a tie: the frozen-LLM variants score the same text the same way.
PERPLEXITY_TIE = 1e-3
CLAIM_VARIANT = "v2.0"
#: The paper's variants, which its claim is about; v2.0 with bidirectional image attention is judged on its own.
PAPER_VARIANTS = ("v1.0", "v1.2", "v1.5", "v2.0")
BIDIRECTIONAL_VARIANT = "v2.0-bidir"


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> metric -> {mean, spread (sample std over seeds, 0 for one seed), n}."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["metrics"])
    summary = {}
    for variant, rows in by_variant.items():
        summary[variant] = {}
        for metric in SUMMARY_METRICS:
            values = [row[metric] for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[variant][metric] = {"mean": statistics.fmean(values), "spread": spread, "n": len(values)}
    return summary


def _beyond_spread(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], metric: str) -> bool | None:
    """Whether two variants' means differ by more than the larger of their seed spreads; None with one seed (a single
    run has no spread to judge a difference against)."""
    if min(a[metric]["n"], b[metric]["n"]) < 2:
        return None
    return abs(a[metric]["mean"] - b[metric]["mean"]) > max(a[metric]["spread"], b[metric]["spread"])


NOISE = {True: "beyond the seed spread", False: "within the seed spread", None: "one seed: no spread to tell it from noise"}


def _best(flag: bool) -> str:
    return f"{CLAIM_VARIANT} best" if flag else f"{CLAIM_VARIANT} NOT best"


def verdict(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Does the result agree with the paper (v2.0 learns vision best and keeps language best)? From the means only.

    Vision: lowest held-out caption loss after stage 2 AND highest held-out VQA accuracy after the shared SFT (each
    part reported). Language: lowest text perplexity after stage 2, ties within PERPLEXITY_TIE counted; the ordering
    after SFT is reported beside it but is not part of the claim (SFT trains every variant's LLM alike).
    """
    mean = {v: {m: s["mean"] for m, s in metrics.items()} for v, metrics in summary.items() if v in PAPER_VARIANTS}
    others = [v for v in mean if v != CLAIM_VARIANT]
    claim = mean[CLAIM_VARIANT]
    best_vqa = max(others, key=lambda v: mean[v]["overall"])
    best_caption = min(others, key=lambda v: mean[v]["caption_loss"])
    lowest_ppl = min(mean[v]["perplexity_stage2"] for v in mean)
    ties = [v for v in others if abs(mean[v]["perplexity_stage2"] - claim["perplexity_stage2"])
            <= PERPLEXITY_TIE * claim["perplexity_stage2"]]
    checks = {
        "vision_best_caption_loss": claim["caption_loss"] < mean[best_caption]["caption_loss"],
        "vision_best_accuracy": claim["overall"] > mean[best_vqa]["overall"],
        "language_kept_best": claim["perplexity_stage2"] <= lowest_ppl * (1 + PERPLEXITY_TIE),
    }
    vision_best = checks["vision_best_caption_loss"] and checks["vision_best_accuracy"]
    sft_order = sorted(mean, key=lambda v: mean[v]["perplexity_sft"])
    lines = [
        f"vision, stage-2 held-out caption loss: {CLAIM_VARIANT} {claim['caption_loss']:.4f} vs best other "
        f"{best_caption} {mean[best_caption]['caption_loss']:.4f} -> {_best(checks['vision_best_caption_loss'])}",
        f"vision, post-SFT held-out VQA overall: {CLAIM_VARIANT} {claim['overall']:.3f} vs best other {best_vqa} "
        f"{mean[best_vqa]['overall']:.3f} -> {_best(checks['vision_best_accuracy'])}",
        f"language, text perplexity after stage 2: {CLAIM_VARIANT} {claim['perplexity_stage2']:.3f} vs lowest "
        f"{lowest_ppl:.3f}" + (f" (tied with {', '.join(ties)})" if ties else "")
        + f" -> {'v2.0 kept language best' if checks['language_kept_best'] else 'v2.0 did NOT keep language best'}",
        "language, text perplexity after SFT (lowest first, not part of the verdict): "
        + ", ".join(f"{v} {mean[v]['perplexity_sft']:.3f}" for v in sft_order)
        + f" -> {CLAIM_VARIANT} ranks {sft_order.index(CLAIM_VARIANT) + 1} of {len(sft_order)}",
    ]
    against = {}  # v2.0 against each other variant of the paper, with the seed spread
    for other in others:
        mine, theirs = summary[CLAIM_VARIANT], summary[other]
        against[other] = {"lower_caption_loss": claim["caption_loss"] < mean[other]["caption_loss"],
                          "caption_loss_beyond_spread": _beyond_spread(mine, theirs, "caption_loss"),
                          "higher_accuracy": claim["overall"] > mean[other]["overall"],
                          "accuracy_beyond_spread": _beyond_spread(mine, theirs, "overall")}
        pair = against[other]
        lines.append(
            f"{CLAIM_VARIANT} vs {other}: stage-2 caption loss {claim['caption_loss']:.4f} vs "
            f"{mean[other]['caption_loss']:.4f} ({'lower' if pair['lower_caption_loss'] else 'NOT lower'}, "
            f"{NOISE[pair['caption_loss_beyond_spread']]}); post-SFT VQA overall {claim['overall']:.3f} vs "
            f"{mean[other]['overall']:.3f} ({'higher' if pair['higher_accuracy'] else 'NOT higher'}, "
            f"{NOISE[pair['accuracy_beyond_spread']]})")
    agrees = vision_best and checks["language_kept_best"]
    if agrees:
        lines.append("AGREES with the paper's claim: v2.0 learned vision best (lowest stage-2 caption loss and highest "
                     "post-SFT VQA accuracy) and kept language best (text perplexity after stage 2, ties counted).")
    else:
        failed = [name for name, ok in checks.items() if not ok]
        lines.append(f"DISAGREES with the paper's claim at this budget ({', '.join(failed)} failed).")
    return {"agrees_with_paper": agrees, "vision_best": vision_best, "checks": checks, "against": against,
            "perplexity_sft_order": sft_order, "lines": lines}


def bidirectional_verdict(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Does bidirectional attention inside images help v2.0? From the means, on the same tokens: it helps if v2.0-bidir
    has the lower stage-2 caption loss AND the higher post-SFT VQA accuracy, hurts if neither, and is mixed otherwise.
    `beyond_spread` says whether both differences exceed the larger seed spread of the two (never with one seed: a
    single run has no spread to judge a difference against). Text perplexity is reported beside it (text-only input is
    computed the same way in both modes)."""
    if BIDIRECTIONAL_VARIANT not in summary:
        return {"checks": {}, "outcome": None, "beyond_spread": False, "lines": []}
    bidir, causal = summary[BIDIRECTIONAL_VARIANT], summary[CLAIM_VARIANT]
    mean = lambda stats, metric: stats[metric]["mean"]  # noqa: E731
    checks = {"lower_caption_loss": mean(bidir, "caption_loss") < mean(causal, "caption_loss"),
              "higher_accuracy": mean(bidir, "overall") > mean(causal, "overall")}
    outcome = "HELPS" if all(checks.values()) else "HURTS" if not any(checks.values()) else "MIXED"
    n = min(bidir["overall"]["n"], causal["overall"]["n"])
    beyond_spread = n > 1 and all(_beyond_spread(bidir, causal, m) for m in ("caption_loss", "overall"))
    noise = NOISE[beyond_spread if n > 1 else None]
    lines = [f"bidirectional image attention ({BIDIRECTIONAL_VARIANT} vs {CLAIM_VARIANT}, same tokens, {n} seed(s)): "
             f"stage-2 caption loss {mean(bidir, 'caption_loss'):.4f} vs {mean(causal, 'caption_loss'):.4f}, post-SFT "
             f"VQA overall {mean(bidir, 'overall'):.3f} vs {mean(causal, 'overall'):.3f}, text ppl after SFT "
             f"{mean(bidir, 'perplexity_sft'):.3f} vs {mean(causal, 'perplexity_sft'):.3f} -> {outcome} ({noise})"]
    return {"checks": checks, "outcome": outcome, "beyond_spread": beyond_spread, "lines": lines}


def _cell(stat: dict[str, float], fmt: str) -> str:
    return format(stat["mean"], fmt) + (f" ± {format(stat['spread'], fmt)}" if stat["n"] > 1 else "")


def ablation_table(results: dict[str, Any]) -> str:
    """Markdown: after stage 2 (caption loss, perplexity), after SFT (accuracy per type with chance and the blind
    model beside it, BLEU-4, perplexity), parameters, tokens and training time per stage."""
    summary, info = results["summary"], results["variants"]
    types = [t for t in QA_TYPES if t in summary[next(iter(summary))]]
    head = ["variant", "stage-2 caption loss", "text ppl after stage 2", *types, "overall", "blind overall",
            "caption BLEU-4", "text ppl after SFT", "params total", "active text / vision token", "stage-2 tokens",
            "SFT tokens", "stage-2 / SFT train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, stats in summary.items():
        p, t = info[variant]["parameters"], info[variant]["tokens"]
        cells = [variant, _cell(stats["caption_loss"], ".4f"), _cell(stats["perplexity_stage2"], ".3f"),
                 *(_cell(stats[m], ".3f") for m in (*types, "overall", "blind_overall")),
                 _cell(stats["caption_bleu4"], ".1f"), _cell(stats["perplexity_sft"], ".3f"), f"{p['total']:,}",
                 f"{p['active_text_token']:,} / {p['active_vision_token']:,}", f"{t['stage2']['tokens']:,}",
                 f"{t['sft']['tokens']:,}", f"{_cell(stats['stage2_s'], '.0f')} / {_cell(stats['sft_s'], '.0f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    chance = {t: f"{results['chance'][t]:.3f}" for t in types}
    lines.append("| " + " | ".join(["chance", *(chance.get(column, "") for column in head[1:])]) + " |")
    return "\n".join(lines)


def _smooth(values: list[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = decay * average + (1 - decay) * value
        out.append(average / (1 - decay ** i))
    return out


def plot_ablation_curves(runs: dict[str, list[Path]], out: Path, decay: float = 0.9) -> Path:
    """Figure 5 style: stage-2 training loss against training tokens, one colour per variant (one line per seed),
    smoothed, with the raw curve faint behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (variant, paths) in zip(colours, runs.items()):
        for seed, path in enumerate(paths):
            rows = jsonio.read_jsonl(path)
            tokens, total = [], 0
            for row in rows:
                total += row["tokens"]
                tokens.append(total)
            losses = [row["loss"] for row in rows]
            ax.plot(tokens, losses, color=colour, alpha=0.15, linewidth=0.8)
            ax.plot(tokens, _smooth(losses, decay), color=colour, label=variant if seed == 0 else None)
    ax.set_xlabel("stage-2 training tokens (text + image)")
    ax.set_ylabel(f"training loss (EMA {decay})")
    ax.set_title("EVE variants, same stage-2 tokens (cf. EVEv2 Figure 5)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
