"""Per-row decoding with the real Qwen tokenizer: deltas, stop strings across token boundaries, UTF-8, EOS, sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from evev2.infer.decoding import PerRowSampling, RowControl, RowDecoder

IM_END = 151645


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def feed(tokenizer, text: str, stop=(), max_new_tokens=1000, eos=(IM_END,), extra_ids=()) -> tuple[RowDecoder, list]:
    deltas: list[str] = []
    decoder = RowDecoder(tokenizer, set(eos), max_new_tokens, list(stop), RowControl(on_delta=deltas.append))
    for token in tokenizer.encode(text, add_special_tokens=False) + list(extra_ids):
        decoder.push(token)
    return decoder, deltas


def test_deltas_concatenate_to_the_text_and_split_no_character(tokenizer):
    text = "Hello 世界! 🦩 naïve café 𓀀 — done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert sum("\ufffd" in tokenizer.decode([i]) for i in ids) >= 5  # 🦩 and 𓀀 really are split over byte tokens
    decoder, deltas = feed(tokenizer, text)
    assert "".join(deltas) == decoder.text == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 5 and decoder.completion_tokens == len(ids) and not decoder.done


def test_piecewise_decoding_equals_decoding_everything_at_once(tokenizer):
    """Random ids include many byte fragments, so characters (and invalid sequences) straddle tokens everywhere."""
    ids = torch.randint(0, 151_643, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder = RowDecoder(tokenizer, {IM_END}, len(ids), [], RowControl())
    for token in ids:
        decoder.push(token)
    assert decoder.finish_reason == "length"
    assert decoder.text == tokenizer.decode(ids).rstrip("\ufffd").lstrip()  # answers start at their first non-space


@pytest.mark.parametrize("text, stop, expected", [
    ("The answer is 42. Question: why?", ["Question:"], "The answer is 42. "),
    ("alpha beta gamma delta", ["mma d", "zzz"], "alpha beta ga"),  # the stop string straddles tokens
    ("one two three", ["two", "one"], ""),  # the earliest hit wins
    ("你好世界，再见", ["世界"], "你好"),
])
def test_stop_strings_cut_the_text_and_are_never_streamed(tokenizer, text, stop, expected):
    decoder, deltas = feed(tokenizer, text, stop=stop)
    assert decoder.text == expected and "".join(deltas) == expected
    assert decoder.finish_reason == "stop"


def test_a_possible_stop_prefix_is_held_back_then_released(tokenizer):
    tail = tokenizer.encode(" GAME", add_special_tokens=False)
    last = tokenizer.encode("!", add_special_tokens=False)
    budget = len(tokenizer.encode("wait for END", add_special_tokens=False)) + len(tail) + len(last)
    decoder, deltas = feed(tokenizer, "wait for END", stop=["END OF"], max_new_tokens=budget)
    assert decoder.text == "wait for " and not decoder.done  # "END" could still become "END OF"
    for token in tail:
        decoder.push(token)
    assert "".join(deltas) == decoder.text == "wait for END GAM"  # a final "E" could start "END OF" again
    for token in last:  # the last token allowed: the row ends and releases what it held back
        decoder.push(token)
    assert "".join(deltas) == decoder.text == "wait for END GAME!" and decoder.finish_reason == "length"


def test_eos_and_length_finish_rows(tokenizer):
    decoder, deltas = feed(tokenizer, "short answer", extra_ids=[IM_END, 1234, 5678])
    assert decoder.finish_reason == "stop" and decoder.text == "short answer" == "".join(deltas)
    assert decoder.completion_tokens == len(tokenizer.encode("short answer")) + 1  # EOS counted, later pads ignored
    decoder, _ = feed(tokenizer, "one two three four five six", max_new_tokens=3)
    assert decoder.finish_reason == "length" and decoder.completion_tokens == 3
    assert decoder.text == tokenizer.decode(tokenizer.encode("one two three four five six")[:3])


def test_cancel_ends_the_row_before_its_next_token(tokenizer):
    control = RowControl()
    decoder = RowDecoder(tokenizer, {IM_END}, 10, [], control)
    decoder.push(5)
    decoder.check_cancelled()
    assert not decoder.done
    control.cancel()
    decoder.check_cancelled()
    decoder.push(9)  # a token decoded after the cancel is ignored
    assert decoder.finish_reason == "cancelled" and decoder.completion_tokens == 1


def nucleus_reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Plain float64 nucleus filter: keep the smallest top set whose mass reaches top_p."""
    scaled = logits.double() / temperature
    probs = scaled.softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    return torch.where(keep, scaled, torch.tensor(-float("inf"), dtype=torch.float64))


def test_per_row_sampling_matches_a_reference_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g, dtype=torch.float64)
    params = [(0.0, 1.0), (0.7, 0.9), (1.3, 1.0), (0.7, 0.9)]
    out = PerRowSampling([t for t, _ in params], [p for _, p in params])(logits)
    greedy = out[0]
    assert torch.isfinite(greedy).sum() == 1 and greedy.argmax() == logits[0].argmax()
    for row, (t, p) in enumerate(params[1:], start=1):
        expected = nucleus_reference(logits[row], t, p)
        assert torch.equal(torch.isfinite(out[row]), torch.isfinite(expected))
        torch.testing.assert_close(out[row][torch.isfinite(out[row])], expected[torch.isfinite(expected)])
    assert 1 < torch.isfinite(out[1]).sum() < 50  # top-p really cut the tail


def test_leading_whitespace_of_an_answer_is_dropped_and_deltas_stay_suffixes(tokenizer):
    """After "ASSISTANT:" the first answer token carries a space; the released text starts at the answer itself."""
    decoder, deltas = feed(tokenizer, "  \n two shapes . a red star", extra_ids=[IM_END])
    assert decoder.text == "two shapes . a red star" == "".join(deltas) and deltas[0].startswith("two")
    assert decoder.finish_reason == "stop"
