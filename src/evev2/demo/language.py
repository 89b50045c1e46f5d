"""Stage 0, the "off-the-shelf LLM": a tiny Qwen2 pretrained on the world's text, and text-only perplexity.

The LLM reads the same language the VLM will be asked in: raw corpus lines (captions, "question answer" lines) and the
training conversations rendered with the chat template but without their images, the way an instruct LLM knows its
chat format before it ever sees a picture. It is saved as a plain HF Qwen2 folder, so the next step is the same
`convert llm` a user runs on Qwen2.5.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from evev2.data.templates import IMAGE_MARKER, get_template, normalize_messages, render
from evev2.train.engine import cosine_with_warmup


@dataclass(frozen=True)
class LLMShape:
    """Decoder size of the stand-in LLM (Qwen2 layout: GQA, q/k/v bias, tied embeddings)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 1024


def chat_documents(records: Sequence[dict], template: str) -> list[str]:
    """The LLaVA conversations rendered with the chat template, images removed: text the VLM will later be asked."""
    chat = get_template(template)
    documents = []
    for record in records:
        messages = [{**m, "value": m["value"].replace(IMAGE_MARKER, "").strip()} for m in record["conversations"]]
        documents.append(render(chat, normalize_messages(messages))[0])
    return documents


def _packed_rows(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], seq_len: int,
                 rng: random.Random) -> torch.Tensor:
    """Shuffle documents, join them with EOS and cut the stream into rows of `seq_len` tokens. -> (rows, seq_len)."""
    order = list(documents)
    rng.shuffle(order)
    ids = tokenizer(order, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens of text are fewer than one row of {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


def pretrain_llm(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], output: Path, shape: LLMShape,
                 steps: int, batch_rows: int = 16, seq_len: int = 256, lr: float = 3e-3, seed: int = 0) -> Path:
    """Next-token pretraining on `documents` (loss on every token); saves model + tokenizer in `output/llm`.

    Writes `output/metrics.jsonl` in the training engine's format, so the demo plots it beside stages 1-3.
    """
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **vars(shape))
    model = Qwen2ForCausalLM(config).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, 0.05, 0.1))
    rng = random.Random(seed)
    rows = _packed_rows(tokenizer, documents, seq_len, rng)
    output.mkdir(parents=True, exist_ok=True)
    metrics = (output / "metrics.jsonl").open("w")
    cursor = 0
    with tqdm(total=steps, desc="stage0-llm", dynamic_ncols=True) as bar:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            if cursor + batch_rows > len(rows):  # next epoch: a fresh shuffle and packing
                rows, cursor = _packed_rows(tokenizer, documents, seq_len, rng), 0
            batch = rows[cursor:cursor + batch_rows]  # (B, T)
            cursor += batch_rows
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_now = scheduler.get_last_lr()[0]
            scheduler.step()
            tokens = batch.numel()
            metrics.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr_now, "tokens": tokens,
                                      "tokens_per_second": tokens / (time.perf_counter() - start)}) + "\n")
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    metrics.close()
    folder = output / "llm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def text_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lines: Sequence[str],
                    batch_size: int = 64) -> float:
    """exp(mean next-token NLL) over `lines`, each followed by EOS; the same number for a Qwen2 LLM and a VLM given
    text only, since both tokenize and score the identical token sequences."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [ids + [eos] for ids in tokenizer(list(lines), add_special_tokens=False)["input_ids"]]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), right padded
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, T-1)
        total_nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))
