"""Continuous (iteration-level) batching: requests join and leave the running batch between decode steps.

One loop thread owns the model while there is work (it starts on the first submission and exits when the batch
drains). Each iteration:
1. admits waiting prompts, up to `max_batch_size` running rows, and prefills them together in one left-padded
   forward (images spliced there, exactly as a lone request's prefill); each gets its first token and a cache slot;
2. runs one decode step for every running row at once, each row at its own length (`SlotKVCache`);
3. feeds each row's token to its `RowDecoder` (deltas, stop strings, EOS, length); a finished or cancelled row leaves
   at once, its future resolved and its slot freed, and a waiting prompt can take that slot at the next iteration.

So a short request never waits for a long one to end, and a finished row never costs another step. Greedy rows are
exactly the request run alone: padding and other rows are masked out of attention, and generated tokens are text, so
the router is a no-op in decode steps.

`compile` (the default on CUDA) takes the per-token Python work out of decoding: the cache is static (fixed buffers),
and a decode step is one `torch.compile(mode="reduce-overhead", dynamic=True)` graph, i.e. a CUDA graph replay. Steps
run over rows and positions rounded up to powers of two (idle slots masked), so a few shapes serve every batch: dynamo
compiles three graphs in all (one row, several rows, and its first shape), and each new shape records one CUDA graph.
The prefill forward is compiled with dynamic shapes. On CPU it is off: eager steps sized to the running rows cost
less there than padded compiled ones.

Why not transformers' continuous batching (`generate_batch`, `ContinuousBatchingManager`, `PagedAttentionCache`):
its requests are token-id lists, and its model runner calls the model on packed `input_ids` with paged-attention
arguments, with no per-request `inputs_embeds` or `mm_token_type_ids`, so an image prompt cannot be spliced or routed;
and its cache needs an attention layer that passes the paged arguments to `cache.update` (ours fails on it).
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from evev2.infer.decoding import FinishReason, PerRowSampling, RowControl, RowDecoder
from evev2.infer.kv_cache import MIN_LENGTH, SlotKVCache

if TYPE_CHECKING:
    from evev2.infer.engine import PreparedPrompt
    from evev2.model import EVEForCausalLM

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int  # what the decoder saw: text tokens + image tokens
    completion_tokens: int  # generated tokens, the EOS token included
    finish_reason: FinishReason  # "stop" (EOS or stop string), "length", or "cancelled" (RowControl.cancel)


@dataclass
class BatchStats:
    """Counters since the engine was built, for health checks, tests and benchmarks."""

    prefills: int = 0  # prefill forwards (each admits one or more rows)
    decode_steps: int = 0
    rows: int = 0  # requests that started generating
    largest_batch: int = 0  # most rows in one decode step
    cancelled_rows: int = 0
    completion_tokens: int = 0
    running: int = 0
    waiting: int = 0
    busy: bool = False  # the loop thread is running


@dataclass(eq=False)
class _Row:
    prompt: PreparedPrompt | None  # dropped once prefilled (its images are no longer needed)
    prompt_tokens: int
    temperature: float
    top_p: float
    decoder: RowDecoder
    future: Future
    length: int = 0  # tokens in this row's cache
    token: int = 0  # the newest token, fed at the next decode step


class ContinuousBatcher:
    """Runs prepared prompts with iteration-level scheduling; `submit` returns one future per prompt."""

    def __init__(self, model: EVEForCausalLM, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int],
                 max_batch_size: int, compile: bool = False) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_batch_size = max_batch_size
        self.compiled = compile
        self.cache = SlotKVCache(model.config.num_hidden_layers, max_batch_size,
                                 int(model.config.max_position_embeddings), static=compile)
        self.prefill_model = torch.compile(model, dynamic=True) if compile else model  # what prefills call
        self._step = torch.compile(self._step_logits, mode="reduce-overhead", dynamic=True) if compile \
            else self._step_logits
        self._counters = BatchStats()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []  # row i owns cache slot i
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> BatchStats:
        with self._lock:
            s = self._counters
            return BatchStats(s.prefills, s.decode_steps, s.rows, s.largest_batch, s.cancelled_rows,
                              s.completion_tokens, len(self._running), len(self._waiting), self._thread is not None)

    def submit(self, prompts: list[PreparedPrompt], controls: list[RowControl]) -> list[Future]:
        """Queue prompts (together: they are admitted in order); each future gets a `GenerationResult`.

        A future cancelled before its prompt is admitted (or whose control is cancelled by then) is never run.
        """
        rows = [_Row(p, p.prompt_tokens, p.request.temperature, p.request.top_p,
                     RowDecoder(self.tokenizer, self.eos_token_ids, p.request.max_new_tokens, p.request.stop, c),
                     Future())
                for p, c in zip(prompts, controls, strict=True)]
        with self._lock:
            self._waiting.extend(rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="evev2-batcher", daemon=True)
                self._thread.start()
        return [row.future for row in rows]

    # ----- the loop -----
    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._running and not self._waiting:
                    self._thread = None  # a later submit starts a new loop
                    self.cache.release()
                    return
                free = self.max_batch_size - len(self._running)
                joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            try:
                with torch.no_grad():
                    self._admit(joining)
                    for row in list(self._running):
                        row.decoder.check_cancelled()
                        if row.decoder.done:
                            self._leave(row)
                    if self._running:
                        self._decode()
            except Exception as err:  # noqa: BLE001 (a failed step fails its requests, never the loop)
                logger.exception("generation failed for %d requests", len(self._running))
                for row in self._running + joining:
                    if not row.future.done():
                        row.future.set_exception(err)
                self._running = []

    def _admit(self, joining: list[_Row]) -> None:
        live = []
        for row in joining:
            # Marked running, so that a late cancellation of the future cannot race with its result being set.
            if row.decoder.control.cancel_event.is_set() or not row.future.set_running_or_notify_cancel():
                row.future.cancel()
            else:
                live.append(row)
        if not live:
            return
        try:
            logits, cache, lengths = self.prefill([row.prompt for row in live])
            tokens = self._sample(live, logits)
        except Exception as err:  # noqa: BLE001 (a failed prefill fails its own requests, not the running ones)
            logger.exception("prefill failed for %d requests", len(live))
            for row in live:
                row.future.set_exception(err)
            return
        self._counters.prefills += 1
        self._counters.rows += len(live)
        padded = cache.layers[0].keys.shape[2]
        for i, (row, length, token) in enumerate(zip(live, lengths, tokens, strict=True)):
            row.prompt, row.length, row.token = None, length, token
            if self._push(row):  # done at its first token: it never takes a slot
                self._finish(row)
                continue
            slot = len(self._running)  # room for every token it may still be fed (its last one never is)
            self.cache.reserve(slot + 1, length + row.decoder.max_new_tokens - 1, cache.layers[0].keys)
            self.cache.insert(slot, [layer.keys[i, :, padded - length:] for layer in cache.layers],
                              [layer.values[i, :, padded - length:] for layer in cache.layers])
            self._running.append(row)

    def prefill(self, prompts: list[PreparedPrompt]) -> tuple[torch.Tensor, DynamicCache, list[int]]:
        """One left-padded forward over the prompts; returns last-position logits (B, V), the cache, real lengths."""
        device = self.model.device
        pad_id = self.tokenizer.pad_token_id
        width = max(p.input_ids.shape[0] for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T), left padded
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - prompt.input_ids.shape[0]:] = prompt.input_ids
            mask[row, width - prompt.input_ids.shape[0]:] = 1
        ids, mask = ids.to(device), mask.to(device)
        images = [image.to(device, self.model.dtype) for p in prompts for image in p.images]
        if images:
            s = self.model.model.embed_inputs(ids, images, mask, padding_side="left")
            inputs = dict(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, position_ids=s.position_ids,
                          mm_token_type_ids=s.mm_token_type_ids, image_ids=s.image_ids)
            mask = s.attention_mask
        else:
            inputs = dict(input_ids=ids, attention_mask=mask)
        cache = DynamicCache(config=self.model.config)
        logits = self.prefill_model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits, cache, (mask > 0).sum(1).tolist()

    def _decode(self) -> None:
        """One token for every running row; rows that finish leave the batch."""
        rows = self._running
        n = len(rows)
        width, kv_len = self._step_shape(n, max(row.length for row in rows) + 1)
        lengths = torch.zeros(width, dtype=torch.long)  # (width,) tokens cached per row; idle slots see position 0
        lengths[:n] = torch.tensor([row.length for row in rows])
        tokens = torch.zeros(width, 1, dtype=torch.long)
        tokens[:n, 0] = torch.tensor([row.token for row in rows])
        device = self.model.device
        lengths, tokens = lengths.to(device), tokens.to(device)
        mask = (torch.arange(kv_len, device=device) <= lengths[:, None]).long()  # (width, kv_len): each row's past
        self.cache.prepare_step(lengths, mask)
        sampled = self._sample(rows, self._step(tokens, lengths[:, None], mask)[:n])
        self._counters.decode_steps += 1
        self._counters.largest_batch = max(self._counters.largest_batch, n)
        for row, token in zip(rows, sampled, strict=True):  # every row first: a leaving row's slot is refilled with
            row.length += 1  # the last row's KV, this step's entry included
            row.token = token
        for row in list(rows):
            if self._push(row):
                self._leave(row)

    def _step_shape(self, rows: int, positions: int) -> tuple[int, int]:
        """The rows and positions a decode step runs over. Eager: exactly the running rows, up to the longest one.
        Compiled: both rounded up to a power of two (within the cache), so that a handful of shapes, each one CUDA
        graph recorded once, serve every batch."""
        if not self.compiled:
            return rows, positions
        slots, length = self.cache.capacity
        return min(slots, _power_of_two(rows)), min(length, max(MIN_LENGTH, _power_of_two(positions)))

    def _step_logits(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) of one decode step: (B, 1) text tokens at (B, 1) positions, KV in the slot cache.

        Embeddings, not ids, go in: text-only inputs need no image-placeholder check (a host sync), and no
        `mm_token_type_ids` tells the router that every token is text, so it needs no count either.
        """
        embeds = self.model.get_input_embeddings()(tokens)
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=self.cache,
                          use_cache=True).logits[:, -1]

    @staticmethod
    def _sample(rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token: greedy rows take the argmax, sampled rows use their own temperature and top-p."""
        logits = logits.float()  # as HF generate: sampling in float32 whatever the model dtype
        temperatures = [row.temperature for row in rows]
        if not any(t > 0 for t in temperatures):
            return logits.argmax(-1).tolist()
        scores = PerRowSampling(temperatures, [row.top_p for row in rows])(logits)
        return torch.multinomial(scores.softmax(-1), 1)[:, 0].tolist()

    @staticmethod
    def _push(row: _Row) -> bool:
        """Give a row its newest token; returns whether it is done (finished, or failed by its own delta callback)."""
        try:
            row.decoder.push(row.token)
        except Exception as err:  # noqa: BLE001 (a failing delta callback fails this request only)
            row.future.set_exception(err)
            return True
        return row.decoder.done

    def _leave(self, row: _Row) -> None:
        """Take a row out of the batch; the last row moves into its slot so that rows 0..n-1 stay contiguous."""
        slot = self._running.index(row)
        last = self._running.pop()
        if last is not row:
            self.cache.move(len(self._running), slot, last.length)
            self._running[slot] = last
        self._finish(row)

    def _finish(self, row: _Row) -> None:
        if row.future.done():  # failed in its delta callback
            return
        d = row.decoder
        self._counters.completion_tokens += d.completion_tokens
        self._counters.cancelled_rows += d.finish_reason == "cancelled"
        row.future.set_result(GenerationResult(d.text, row.prompt_tokens, d.completion_tokens, d.finish_reason))


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
