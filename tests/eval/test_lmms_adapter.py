"""Continuation log-likelihood (always) and the lmms-eval model class (only where lmms-eval is installed).

lmms-eval is an optional extra with heavy dependencies; its tests are skipped when `lmms_eval` cannot be imported.
They need only its API, not its dependency tree: `make setup` installs `--no-deps lmms-eval loguru pytz` (pyyaml comes
with transformers), so they run in `make test` and CI (README, "lmms-eval", has the full extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evev2.eval.likelihood import continuation_logprob, continuation_logprobs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_and_processor(tiny_eve_chat_dir):
    from evev2.data.processor import EVEProcessor
    from evev2.model import EVEForCausalLM

    model = EVEForCausalLM.from_pretrained(tiny_eve_chat_dir, dtype=torch.float64).eval()
    return model, EVEProcessor.from_pretrained(tiny_eve_chat_dir)


def noise_image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def user(text: str, num_images: int):
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_logprob_matches_the_model_loss(model_and_processor, num_images):
    """Reference: the model's own supervised loss (mean cross-entropy over the continuation tokens) x count."""
    model, processor = model_and_processor
    images = [noise_image(i, 64, 32 + 16 * i) for i in range(num_images)]
    messages, continuation = user("Which colour is the square?", num_images), " dark blue"
    logprob, _ = continuation_logprob(model, processor, messages, images, continuation)

    prompt_ids = processor(processor.apply_chat_template(messages), images=images or None)["input_ids"][0]
    target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    input_ids = torch.cat([prompt_ids, torch.tensor(target)]).unsqueeze(0)
    labels = torch.cat([torch.full_like(prompt_ids, -100), torch.tensor(target)]).unsqueeze(0)
    pixels = [p.double() for p in processor.image_processor(images)["pixel_values"]] if images else None
    loss = model(input_ids=input_ids, images=pixels, labels=labels).loss
    assert logprob < 0
    assert logprob == pytest.approx(-loss.item() * len(target), rel=1e-10)


def test_a_left_padded_batch_scores_each_request_as_it_scores_alone(model_and_processor):
    """Prompts of different lengths (0-2 images of several sizes) and continuations of different lengths."""
    model, processor = model_and_processor
    requests = [(user("Which colour is the square?", 1), [noise_image(1, 64, 32)], " dark blue"),
                (user("Hi", 0), [], " yes"),
                (user("Compare them.", 2), [noise_image(2, 32, 64), noise_image(3, 48, 48)], " the left one is red"),
                (user("What is shown?", 1), [noise_image(4, 16, 16)], " a"),
                (user("Hello there, how are you?", 0), [], " fine thanks")]
    batched = continuation_logprobs(model, processor, requests)
    alone = [continuation_logprobs(model, processor, [request])[0] for request in requests]
    assert len({score for score, _ in alone}) == len(requests)
    for (score, greedy), (reference, reference_greedy) in zip(batched, alone):
        assert score == pytest.approx(reference, rel=1e-9) and greedy == reference_greedy


def test_greedy_flag(model_and_processor):
    model, processor = model_and_processor
    images = [noise_image(5, 48, 48)]
    messages = user("What is shown?", 1)
    encoded = processor(processor.apply_chat_template(messages), images=images)
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"], images=[p.double() for p in encoded["images"]],
                       logits_to_keep=1).logits[0, -1]
    ranked = logits.argsort(descending=True).tolist()

    def round_trips(token: int) -> bool:
        text = processor.tokenizer.decode([token])
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"] == [token]

    # The model's favourite next token, and its least favourite one that survives decode/encode as one token.
    best, worst = ranked[0], next(t for t in reversed(ranked) if round_trips(t))
    assert round_trips(best), "the test needs the argmax token to survive decode/encode"
    best_logprob, best_greedy = continuation_logprob(model, processor, messages, images,
                                                     processor.tokenizer.decode([best]))
    worst_logprob, worst_greedy = continuation_logprob(model, processor, messages, images,
                                                       processor.tokenizer.decode([worst]))
    assert best_greedy and not worst_greedy
    assert best_logprob == pytest.approx(torch.log_softmax(logits, -1)[best].item(), rel=1e-10)
    assert worst_logprob < best_logprob


def test_empty_continuation_is_refused(model_and_processor):
    with pytest.raises(ValueError, match="empty"):
        continuation_logprob(*model_and_processor, user("Hi", 0), [], "")


# ---------------------------------------------------------------- lmms-eval (optional)


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval.api.instance", reason="lmms-eval (optional extra [lmms]) not installed")


@pytest.fixture(scope="module")
def adapter(lmms_eval, tiny_eve_chat_dir):
    from evev2.eval.lmms_eval_adapter import EVEv2

    model = EVEv2.create_from_arg_string(f"pretrained={tiny_eve_chat_dir},device=cpu,dtype=float64",
                                         {"batch_size": "2", "device": None})
    docs = [{"image": noise_image(i, 32 + 16 * (i % 3), 64)} for i in range(5)]
    model.task_dict = {"gqa": {"test": docs}}
    return model


def doc_to_visual(doc):
    return [doc["image"]]


def instance(lmms_eval, request_type, arguments, doc_id):
    return lmms_eval.Instance(request_type=request_type, arguments=arguments, idx=0,
                              metadata={"task": "gqa", "doc_id": doc_id, "repeats": 1})


def test_entry_point_resolves_to_the_adapter(lmms_eval):
    import tomllib  # Python >= 3.11

    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from evev2.eval.lmms_eval_adapter import EVEv2, lmms_eval_manifest

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"evev2": "evev2.eval.lmms_eval_adapter:lmms_eval_manifest"}
    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_manifest())
    assert registry.get_model_class("evev2") is EVEv2  # also checks: an lmms subclass, simple


def test_generate_until_equals_the_engine_in_original_order(lmms_eval, adapter):
    from evev2.infer.engine import GenerationRequest

    greedy = {"until": ["\n\n"], "max_new_tokens": 3, "do_sample": False, "temperature": 0}
    shorter = {"until": "ASSISTANT", "max_new_tokens": 2, "num_beams": 1}
    kwargs = [greedy, shorter, greedy, greedy, shorter]
    stops = [["\n\n"], ["ASSISTANT"], ["\n\n"], ["\n\n"], ["ASSISTANT"]]
    requests = [instance(lmms_eval, "generate_until", (f"Question {i}?", dict(kwargs[i]), doc_to_visual, i, "gqa",
                                                       "test"), i) for i in range(5)]
    answers = adapter.generate_until(requests)
    docs = adapter.task_dict["gqa"]["test"]
    for i, answer in enumerate(answers):
        alone = GenerationRequest(messages=user(f"Question {i}?", 1), images=[docs[i]["image"]],
                                  max_new_tokens=kwargs[i]["max_new_tokens"], stop=stops[i])
        assert answer == adapter.engine.generate([alone])[0].text


def test_beam_search_is_refused(lmms_eval, adapter):
    request = instance(lmms_eval, "generate_until", ("Q?", {"num_beams": 3}, doc_to_visual, 0, "gqa", "test"), 0)
    with pytest.raises(ValueError, match="num_beams"):
        adapter.generate_until([request])


def test_loglikelihood_requests_batched_equal_each_alone_in_original_order(lmms_eval, adapter):
    """batch_size 2 over five requests of different lengths (sorted by length, so the chunks mix images and none)."""
    docs = adapter.task_dict["gqa"]["test"]
    asked = [("Is it red?", " yes", 1), ("Is it red?", lambda doc: " no", 1), ("", " yes", None),
             ("Which of these colours is the largest area of the picture?", " blue", 4), ("Red?", " a red one", 2)]
    requests = [instance(lmms_eval, "loglikelihood", (context, target, doc_to_visual, doc, "gqa", "test")
                         if doc is not None else (context, target), doc or 0) for context, target, doc in asked]
    results = adapter.loglikelihood(requests)
    model, processor = adapter.engine.model, adapter.engine.processor
    for (context, target, doc), (logprob, greedy) in zip(asked, results, strict=True):
        images = [docs[doc]["image"]] if doc is not None else []
        continuation = target if isinstance(target, str) else target(docs[doc])
        alone = continuation_logprob(model, processor, user(context, len(images)), images, continuation)
        assert logprob == pytest.approx(alone[0], rel=1e-9) and greedy == alone[1]
        assert isinstance(logprob, float) and logprob < 0 and isinstance(greedy, bool)
    assert len({logprob for logprob, _ in results}) == len(results)  # five different requests, five scores
