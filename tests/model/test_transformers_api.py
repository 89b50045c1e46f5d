"""EVEv2 as transformers users run every other VLM: `AutoProcessor`, `AutoModelForImageTextToText` and the
`image-text-to-text` pipeline, on folders made each way users make them (tiny random models, real Qwen tokenizer)."""

from __future__ import annotations

import base64
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)

from evev2.data.image_processing import EVEImageProcessor
from evev2.data.processor import EVEProcessor
from evev2.data.templates import IMAGE_TOKEN_INDEX
from evev2.infer import GenerationRequest, InferenceEngine
from evev2.infer.chat import chat_cli
from evev2.model import EVEConfig, EVEForCausalLM
from tests.serve.conftest import png_bytes, to_data_url

REPO = Path(__file__).resolve().parents[2]


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "path": str(i)} for i in images),
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    """Noise PNGs of different sizes (so their token counts differ)."""
    root = tmp_path_factory.mktemp("pngs")
    paths = [root / f"{i}.png" for i in range(3)]
    for path, (h, w), seed in zip(paths, [(64, 64), (32, 64), (64, 32)], [3, 4, 5]):
        path.write_bytes(png_bytes(h, w, seed))
    return paths


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory, tiny_vlm_dir, tiny_world_dir) -> Path:
    """A folder written by the Trainer's export (one step of chat-template training from a converted LLM)."""
    from evev2.cli import main as cli
    from tests.train.test_engine import write_recipe

    root = tmp_path_factory.mktemp("export")
    recipe = write_recipe(root / "sft.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed"]', template="eve", steps=1)
    return cli(["train", "--recipe", str(recipe), "--output", str(root / "run")])


@pytest.fixture(scope="module")
def pipe(tiny_eve_chat_dir):
    return pipeline("image-text-to-text", model=str(tiny_eve_chat_dir))


@pytest.mark.parametrize("kind", ["save_pretrained", "convert", "export"])
def test_auto_classes_load_every_kind_of_folder(kind, request, pngs):
    folder = request.getfixturevalue({"save_pretrained": "tiny_eve_chat_dir", "convert": "tiny_vlm_dir",
                                      "export": "exported_dir"}[kind])
    assert isinstance(AutoConfig.from_pretrained(folder), EVEConfig)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is EVEProcessor and processor.template.name == "eve"
    assert type(AutoImageProcessor.from_pretrained(folder)) is EVEImageProcessor
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is EVEForCausalLM
    answer = pipeline("image-text-to-text", model=str(folder))(text=[user("What is it?", pngs[0])], max_new_tokens=3,
                                                               return_full_text=False)
    assert answer[0]["generated_text"]


def test_processor_save_and_load_round_trip(tiny_eve_chat_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_eve_chat_dir, max_size=96, resize_policy="native")
    assert (processor.image_processor.max_size, processor.image_processor.resize_policy) == (96, "native")
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.template.name == "eve" and loaded.tokenizer.padding_side == "left"
    assert "max_size" not in (tmp_path / "tokenizer_config.json").read_text()  # overrides reach the images only
    assert (tmp_path / "chat_template.jinja").read_text() == processor.template.jinja


def test_chat_template_gives_the_trained_prompt_and_the_chat_commands_inputs(tiny_eve_chat_dir, pngs):
    processor = AutoProcessor.from_pretrained(tiny_eve_chat_dir)
    messages = [user("What is in the picture?", pngs[0])]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nWhat is in the picture? ASSISTANT:")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    # training: the same conversation with an answer starts with exactly these ids
    trained = processor.encode_conversation([*messages, {"role": "assistant", "content": "Noise."}], num_images=1)
    assert trained.input_ids[:inputs["input_ids"].shape[1]] == inputs["input_ids"][0].tolist()
    # `evev2 chat` (the inference engine): the same ids and the same pixels
    engine = InferenceEngine.from_pretrained(tiny_eve_chat_dir)
    chat_message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}
    prepared = engine.prepare(GenerationRequest(messages=[chat_message], images=[str(pngs[0])]))  # as ChatSession
    assert torch.equal(inputs["input_ids"][0], prepared.input_ids)
    unpacked = engine.model.model.image_inputs(None, inputs["pixel_values"], inputs["image_sizes"])
    assert torch.equal(unpacked[0], prepared.images[0])
    # and the model takes the processor's output as it is
    logits = engine.model(**inputs).logits
    assert torch.equal(logits, engine.model(input_ids=prepared.input_ids[None], images=prepared.images).logits)


def test_every_image_part_form_gives_the_same_pixels(tiny_eve_chat_dir, pngs):
    processor = AutoProcessor.from_pretrained(tiny_eve_chat_dir)
    data = pngs[1].read_bytes()
    parts = [{"type": "image", "path": str(pngs[1])}, {"type": "image", "url": str(pngs[1])},
             {"type": "image", "image": Image.open(io.BytesIO(data))},
             {"type": "image", "base64": base64.b64encode(data).decode()},
             {"type": "image_url", "image_url": {"url": to_data_url(data)}}]
    batches = [processor.apply_chat_template([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
                                             tokenize=True, return_dict=True, return_tensors="pt") for part in parts]
    for batch in batches:
        assert torch.equal(batch["input_ids"], batches[0]["input_ids"])
        assert torch.equal(batch["pixel_values"], batches[0]["pixel_values"])
        assert batch["image_sizes"].tolist() == [[32, 64]]


def test_batched_conversations_are_left_padded_and_text_only_rows_have_no_patches(tiny_eve_chat_dir, pngs):
    processor = AutoProcessor.from_pretrained(tiny_eve_chat_dir)
    batch = processor.apply_chat_template([[user("Compare these two pictures, please.", pngs[1], pngs[2])],
                                           [user("Hi")]], tokenize=True, return_dict=True, return_tensors="pt")
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1).tolist() == [2, 0]
    assert batch["attention_mask"][:, -1].tolist() == [1, 1] and batch["attention_mask"][1, 0] == 0
    assert batch["pixel_values"].shape == (2 + 2, 3 * 32 * 32) and batch["image_sizes"].tolist() == [[32, 64], [64, 32]]
    text_only = processor.apply_chat_template([user("Hi")], tokenize=True, return_dict=True, return_tensors="pt")
    assert text_only["pixel_values"].shape == (0, 3 * 32 * 32) and text_only["image_sizes"].shape == (0, 2)


def test_continue_final_message_leaves_the_answer_open(tiny_eve_chat_dir):
    processor = AutoProcessor.from_pretrained(tiny_eve_chat_dir)
    prefill = [user("What is it?"), {"role": "assistant", "content": [{"type": "text", "text": "It is "}]}]
    assert processor.apply_chat_template(prefill, continue_final_message=True).endswith("ASSISTANT: It is")


def test_pipeline_greedy_answer_equals_evev2_chat(pipe, tiny_eve_chat_dir, pngs):
    for image, question in [(pngs[0], "What is this?"), (pngs[2], "Describe the picture in detail.")]:
        out = io.StringIO()
        with redirect_stdout(out):
            chat_cli(model=tiny_eve_chat_dir, image=[str(image)], prompt=question, max_new_tokens=8)
        chat_answer = out.getvalue().removesuffix("\n")
        answer = pipe(text=[user(question, image)], max_new_tokens=8, return_full_text=False)[0]["generated_text"]
        # the template's "ASSISTANT:" is followed by the answer's first token, space included; chat strips that space
        assert answer.lstrip() == chat_answer and chat_answer
    assert pipe(text=[user("What is this?", pngs[1])], max_new_tokens=8, return_full_text=False) != \
        pipe(text=[user("What is this?", pngs[0])], max_new_tokens=8, return_full_text=False)  # the image counts


# The prompt reaches `generate` as embeddings, so transformers warns that the penalty sees the answer only (README).
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`:UserWarning")
def test_pipeline_batches_and_takes_generation_kwargs(tiny_eve_chat_dir, pngs):
    pipe = pipeline("image-text-to-text", model=str(tiny_eve_chat_dir), dtype=torch.float64)  # exact equality
    chats = [[user("What is this?", pngs[0])], [user("Compare them.", pngs[1], pngs[2])],
             [user("A question without any image, and longer than the others.")]]
    alone = [pipe(text=chat, max_new_tokens=6, return_full_text=False)[0]["generated_text"] for chat in chats]
    batched = pipe(text=chats, max_new_tokens=6, return_full_text=False, batch_size=3)
    assert [row[0]["generated_text"] for row in batched] == alone
    full = pipe(text=chats[0], max_new_tokens=6)[0]["generated_text"]
    assert full[:-1] == chats[0] and full[-1] == {"role": "assistant", "content": alone[0]}
    tokens = pipe(text=chats[0], max_new_tokens=2, return_tensors=True)[0]["generated_token_ids"]
    prompt = pipe.processor.apply_chat_template(chats[0], tokenize=True)
    assert tokens.shape[0] == prompt.shape[1] + 2
    penalised = pipe(text=chats[0], max_new_tokens=6, return_full_text=False,
                     generate_kwargs={"repetition_penalty": 2.0})[0]["generated_text"]
    assert penalised != alone[0]  # the tiny random model repeats one token unless penalised


def test_readme_pipeline_example_runs(tiny_eve_chat_dir, pngs):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    code = next(block for block in blocks if "pipeline(" in block)
    code = code.replace('"path/to/eve-folder"', repr(str(tiny_eve_chat_dir))).replace('"cat.png"', repr(str(pngs[0])))
    namespace: dict = {}
    with redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["answer"][0]["generated_text"][-1]["role"] == "assistant"
