"""`evev2 eval run`: ask a model every question of a benchmark, then score the answers.

The prompts and the scoring both come from the task registry (`evev2.eval.tasks`), and generation goes through the
one inference path (`InferenceEngine`), so a number printed here is the number `evev2 eval score` gives for the same
predictions file. Predictions are appended as they are produced, so a killed run resumes where it stopped; `run.json`
beside them records what was run (model, weights, question file, answer length), and a results folder of another run
is refused instead of resumed. Under `torchrun` every rank answers a strided shard into its own file and rank 0 merges
them and scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Literal, Sequence

import torch.distributed as dist
from tqdm import tqdm

from evev2 import jsonio
from evev2.distributed import distributed_session
from evev2.errors import UserError
from evev2.eval.commands import save_and_print_metrics
from evev2.eval.predictions import PredictionWriter, read_predictions
from evev2.eval.records import MAX_BAD_FRACTION, check_bad_fraction
from evev2.eval.report import metrics_document
from evev2.eval.tasks import EvalItem, get_task, load_items
from evev2.infer.engine import Generate, GenerationRequest, GenerationResult, InferenceEngine
from evev2.infer.errors import InvalidRequestError

logger = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.jsonl"
METRICS_NAME = "metrics.json"
RUN_NAME = "run.json"



@dataclass(frozen=True)
class Shard:
    """This process's share of the questions: items `rank`, `rank + world_size`, ... (strided, so every rank gets
    a similar mix of question types and lengths)."""

    rank: int = 0
    world_size: int = 1

    def take(self, items: Sequence[EvalItem]) -> list[EvalItem]:
        return list(items[self.rank::self.world_size])

    def predictions_path(self, run_dir: Path) -> Path:
        """A single process writes the final file directly; ranks write their own and rank 0 merges."""
        return run_dir / (PREDICTIONS_NAME if self.world_size == 1 else f"predictions.rank{self.rank}.jsonl")


def item_request(item: EvalItem, max_new_tokens: int) -> GenerationRequest:
    """One user turn: the item's images (as `image` parts, the template places them) and its prompt text."""
    content = [{"type": "image"} for _ in item.image_paths] + [{"type": "text", "text": item.prompt_text}]
    return GenerationRequest(messages=[{"role": "user", "content": content}], images=list(item.image_paths),
                             max_new_tokens=max_new_tokens, temperature=0.0)


class _SkipCounter:
    """Questions that could not be asked (corrupt or missing image, prompt too long): logged, counted, and the run
    fails as soon as they exceed `max_fraction` of the shard, rather than after hours of a broken run."""

    def __init__(self, total: int, max_fraction: float) -> None:
        self.total, self.max_fraction, self.count = total, max_fraction, 0

    def skip(self, item: EvalItem, error: Exception) -> None:
        self.count += 1
        logger.warning("skipped question %s: %s", item.question_id, error)
        check_bad_fraction(self.count, self.total, "questions (could not be asked)", self.max_fraction)


def _answer_batch(generate: Generate, batch: list[EvalItem], max_new_tokens: int, skips: _SkipCounter
                  ) -> list[tuple[EvalItem, GenerationResult]]:
    """Answers for a batch; when the engine refuses the batch (a bad image or an over-long prompt in it), each
    question is retried alone so that only the bad ones are lost."""
    try:
        return list(zip(batch, generate([item_request(item, max_new_tokens) for item in batch]), strict=True))
    except InvalidRequestError as error:
        if len(batch) == 1:
            skips.skip(batch[0], error)
            return []
    return [pair for item in batch for pair in _answer_batch(generate, [item], max_new_tokens, skips)]


def answer_items(generate: Generate, items: Sequence[EvalItem], predictions: Path, batch_size: int = 8,
                 max_new_tokens: int = 128, finished: Collection[str] = (), show_progress: bool = True,
                 max_bad_fraction: float = MAX_BAD_FRACTION) -> int:
    """Append an answer for every item not yet in `predictions` (nor in `finished`); returns how many were skipped.

    Each answer is flushed as soon as its batch returns, so an interruption loses at most one batch of work.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with PredictionWriter(predictions) as writer:
        pending = [item for item in items if not writer.done(item.question_id) and item.question_id not in finished]
        skips = _SkipCounter(len(items), max_bad_fraction)
        with tqdm(total=len(items), initial=len(items) - len(pending), desc="answering", unit="q",
                  disable=not show_progress) as progress:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                for item, result in _answer_batch(generate, batch, max_new_tokens, skips):
                    writer.write(item.question_id, result.text, finish_reason=result.finish_reason,
                                 completion_tokens=result.completion_tokens)
                progress.update(len(batch))
    return skips.count


def merge_rank_predictions(run_dir: Path, world_size: int) -> Path:
    """Fold every rank's file into `predictions.jsonl` (kept across reruns; an id already there is not repeated)."""
    merged = run_dir / PREDICTIONS_NAME
    with PredictionWriter(merged) as writer:
        for rank in range(world_size):
            path = Shard(rank, world_size).predictions_path(run_dir)
            if not path.exists():
                raise FileNotFoundError(f"rank {rank} wrote no predictions ({path} is missing)")
            for question_id, text in read_predictions(path).items():
                if not writer.done(question_id):
                    writer.write(question_id, text)
    return merged


def file_identity(path: Path) -> dict[str, Any]:
    """Where a file is and which version of it (size, modification time): cheap for multi-GB weights."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def check_run_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Record what a results folder answers for, or refuse to resume another run's answers there.

    Resuming keeps every answer already in the folder, so answers of another model (or of another question file with
    the same ids) would be scored as this run's.
    """
    path = run_dir / RUN_NAME
    if path.exists():
        recorded = jsonio.read_json(path)
        changed = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k) != identity.get(k))
        if changed:
            raise UserError(f"{run_dir} holds the answers of another run ({', '.join(changed)} differ); pass another "
                            "--output, or delete that folder to start again")
        return
    if any(run_dir.glob("predictions*.jsonl")):
        raise UserError(f"{run_dir} holds answers with no {RUN_NAME} saying what produced them; pass another "
                        "--output, or delete that folder to start again")
    run_dir.mkdir(parents=True, exist_ok=True)
    jsonio.write_json(path, identity)


def run_benchmark(generate: Generate, model_name: str, task: str, data: Path, questions: Path | None = None,
                  image_root: Path | None = None, limit: int | None = None, batch_size: int = 8,
                  output: Path = Path("eval_results"), max_new_tokens: int = 128, shard: Shard = Shard(),
                  barrier: Callable[[], None] = lambda: None,
                  identity: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Answer this shard's questions, then (on rank 0, after `barrier`) merge, score and write metrics.json.

    `identity` (what `generate` is: model and weights) is checked against the folder's `run.json` with the question
    file and answer length (`check_run_identity`, on rank 0). Returns the metrics document on rank 0 and None on the
    other ranks.
    """
    benchmark = get_task(task)
    data = Path(data)
    # Question files name their images relative to their own folder (our synth world) unless told otherwise.
    items = load_items(benchmark, data, questions, image_root if image_root is not None else data.parent)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"{data} holds no {task} questions")
    run_dir = Path(output) / model_name / task
    if identity is not None and shard.rank == 0:
        check_run_identity(run_dir, {**identity, "task": task, "data": file_identity(data),
                                     "questions": None if questions is None else file_identity(questions),
                                     "max_new_tokens": max_new_tokens})
    merged = run_dir / PREDICTIONS_NAME
    finished = set(read_predictions(merged)) if shard.world_size > 1 and merged.exists() else set()
    skipped = answer_items(generate, shard.take(items), shard.predictions_path(run_dir), batch_size, max_new_tokens,
                           finished, show_progress=shard.rank == 0)
    if skipped:
        logger.warning("rank %d: %d questions could not be asked; a rerun retries them", shard.rank, skipped)
    barrier()
    if shard.rank != 0:
        return None
    if shard.world_size > 1:
        merge_rank_predictions(run_dir, shard.world_size)
    metrics = benchmark.score(items, read_predictions(merged))
    sources = {"annotations": str(data), "predictions": str(merged)}
    if questions is not None:
        sources["questions"] = str(questions)
    if limit is not None:
        sources["limit"] = str(limit)
    document = metrics_document(task, model_name, benchmark.headline, metrics, **sources)
    save_and_print_metrics(document, run_dir / METRICS_NAME)
    return document


def run_cli(*, model: Path, task: str, data: Path, questions: Path | None = None, image_root: Path | None = None,
            limit: int | None = None, batch_size: int = 8, output: Path = Path("eval_results"),
            max_new_tokens: int = 128, device: str | None = None, dtype: str | None = None,
            quantize: Literal["int8"] | None = None) -> dict[str, Any] | None:
    """Run a model on a benchmark (batched greedy decoding, resumable), then score it like `evev2 eval score`.

    Writes OUTPUT/<model folder name>/<task>/predictions.jsonl and metrics.json. Under torchrun each rank answers a
    strided shard (predictions.rank<r>.jsonl) and rank 0 merges and scores.

    Args:
        model: EVEv2 model folder (weights + processor files).
        task: benchmark name: vqav2, gqa, textvqa, chartqa, ocrbench, scienceqa_img, mmbench, seed_image, ai2d,
            pope, mme or synth.
        data: annotation file (.jsonl, .json, .tsv, or .parquet when pyarrow is installed).
        questions: optional LLaVA question JSONL, joined with the annotations on question_id.
        image_root: folder the records' image paths are relative to (and where embedded images are written);
            default the data file's folder.
        limit: only the first N questions (after MMBench's rotations are added).
        batch_size: questions per generate call.
        output: results folder.
        max_new_tokens: answer length cap.
        device: e.g. cpu, cuda, cuda:1; default cuda when available (each torchrun rank uses its LOCAL_RANK GPU).
        dtype: float32, bfloat16 or float16; default bfloat16 on GPU, float32 on CPU.
        quantize: int8 stores the decoder's linear weights as int8 (torchao, the `quantize` extra); results go
            under "<model folder name>-int8", apart from the unquantized model's.
    """
    get_task(task)  # an unknown task fails before the model is loaded
    with distributed_session() as (rank, world_size, rank_device):
        shard = Shard(rank, world_size)
        if device is None and world_size > 1:
            device = str(rank_device)  # each torchrun rank on its own GPU
        engine = InferenceEngine.from_pretrained(model, device=device, dtype=dtype, quantize=quantize)
        name = Path(model).resolve().name + (f"-{quantize}" if quantize else "")
        identity = {"model": str(Path(model).resolve()), "quantize": quantize, "dtype": str(engine.model.dtype),
                    "weights": [file_identity(f) for f in sorted(Path(model).glob("*.safetensors"))]}
        return run_benchmark(engine.generate, name, task, data, questions, image_root, limit,
                             batch_size, output, max_new_tokens, shard,
                             barrier=dist.barrier if world_size > 1 else lambda: None, identity=identity)
