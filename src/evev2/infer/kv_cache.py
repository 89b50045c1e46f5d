"""The KV cache of continuous batching: one slot per running row, each row with its own length.

HF's caches share one length across the batch (`DynamicCache`, `StaticCache`), so a row could only join at the
batch's length (re-padding everyone) and leave by re-slicing everyone. Here row `i` of the running batch owns slot `i`
of preallocated `[slots, kv_heads, length, head_dim]` tensors, its tokens at positions `0..len_i-1`:
- a row joins by copying its prefill KV into a free slot (`insert`), without touching the others;
- a row leaves by moving the last row into its slot (`move`), so running rows stay in slots `0..n-1` and a decode
  step reads one contiguous view `[:n, :, :kv_len]` instead of gathering rows;
- a decode step writes each row's new key and value at that row's own length (`update`) and masks, per row, the
  positions past it (the mask comes from `attention_mask`, built by HF's own mask functions from
  `get_mask_sizes`/`get_query_offset`).

The tensors grow by doubling (rows and length) and are dropped when the batch drains (`release`), so an idle engine
holds no KV memory. A `static` cache (the compiled decode path) holds every slot from the start, grows only in
length, and keeps its buffers when idle, as CUDA graphs replay against fixed addresses (a growth re-records them).
"""

from __future__ import annotations

import torch

MIN_LENGTH = 256  # the first allocation: short prompts should not regrow the cache every few steps


class SlotKVCache:
    """Per-row KV storage with the parts of HF's `Cache` interface that the decoder and its mask functions call."""

    is_compileable = True  # HF's mask functions then always build the mask of a decode step: one graph, no branch

    def __init__(self, num_layers: int, max_rows: int, max_length: int, static: bool = False) -> None:
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.max_length = max_length
        self.static = static
        self.keys: list[torch.Tensor] = []  # per layer (slots, kv_heads, length, head_dim)
        self.values: list[torch.Tensor] = []
        self._write = torch.empty(0, dtype=torch.long)  # (n,) where each row's new token goes
        self._read = torch.empty(0, 0, dtype=torch.long)  # (n, kv_len) the step's attention mask

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, positions) allocated now."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    # ----- joining, leaving -----
    def reserve(self, rows: int, length: int, like: torch.Tensor) -> None:
        """Make room for `rows` slots of `length` positions; `like` is one layer's (B, kv_heads, L, head_dim) keys."""
        if rows > self.max_rows or length > self.max_length:
            raise ValueError(f"{rows} rows of {length} positions exceed the cache's "
                             f"{self.max_rows} x {self.max_length}")
        have_rows, have_length = self.capacity
        if rows <= have_rows and length <= have_length:
            return
        # Doubling: O(1) amortised copies per row and per position.
        rows = self.max_rows if self.static else min(self.max_rows, max(rows, 2 * have_rows))
        length = min(self.max_length, max(length, 2 * have_length, MIN_LENGTH))
        shape = (rows, like.shape[1], length, like.shape[3])
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape, dtype=like.dtype, device=like.device)
                if layer < len(store):
                    old = store[layer]
                    grown[:old.shape[0], :, :old.shape[2]] = old
                    store[layer] = grown
                else:
                    store.append(grown)
        if self.static:
            for tensor in self.keys + self.values:
                torch._dynamo.mark_static_address(tensor)  # CUDA graphs replay against these exact buffers

    def insert(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store one row's prefill: per layer (kv_heads, L, head_dim), at positions 0..L-1 of `slot`."""
        length = keys[0].shape[1]
        for layer in range(self.num_layers):
            self.keys[layer][slot, :, :length] = keys[layer]
            self.values[layer][slot, :, :length] = values[layer]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target` (a row leaving frees `target`)."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def release(self) -> None:
        """Drop the tensors (nothing is running); a static cache keeps its buffers."""
        if not self.static:
            self.keys, self.values = [], []

    # ----- one decode step -----
    def prepare_step(self, lengths: torch.Tensor, mask: torch.Tensor) -> None:
        """The next forward feeds one token for each of rows 0..n-1 (`lengths`: (n,) tokens cached so far) and reads
        positions 0..kv_len-1 under `mask` (n, kv_len), its attention mask (kv_len > max(lengths)).

        The read extent is kept as a tensor's shape, not an int: a compiled step then sees a dynamic size, and one
        graph serves every length instead of one compilation per length.
        """
        self._write = lengths
        self._read = mask

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new (n, kv_heads, 1, head_dim) states at its own length; return the n rows' KV so far."""
        n, kv_len = self._read.shape
        rows = torch.arange(n, device=key_states.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, self._write] = key_states[:, :, 0]
        values[rows, :, self._write] = value_states[:, :, 0]
        return keys[:n, :, :kv_len], values[:n, :, :kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Past length as HF's mask functions see it: the query sits at the last read position."""
        return self._read.shape[1] - 1

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._read.shape[1] - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._read.shape[1], 0
