"""A small byte-level BPE tokenizer trained on the synthetic world's language: the stand-in for Qwen's tokenizer.

Byte-level BPE (as Qwen uses) keeps `decode(encode(text)) == text` exactly, which the chat templates' label code
checks, and its offsets tile the text. The vocabulary is small enough that every world word and every chat-template
word is one token, so sequences stay short on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
CHAT_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, CHAT_START, EOS_TOKEN)


def train_world_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` and wrap it like Qwen's: `<|endoftext|>` pads, `<|im_end|>` ends a turn."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[CHAT_START], model_max_length=4096)

