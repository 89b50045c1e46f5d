"""LoRA through PEFT (`[lora]`): what trains, both exports, exact resume after SIGKILL, FSDP2 == one process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from evev2.model import EVEForCausalLM
from evev2.train.engine import Trainer
from evev2.train.groups import parameter_groups
from evev2.train.lora import export_lora
from evev2.train.recipe import RecipeError, load_recipe
from tests.train.test_engine import (WEIGHT_ATOL, changed, losses, sigkill_after_checkpoint, weights,
                                     write_recipe)

LORA = "[lora]\nrank = 4\nalpha = 8.0\ndropout = {dropout}\ngroups = {groups}\n"


def lora_recipe(path: Path, source: Path, world: Path, trainable: str = '["patch_embed"]',
                groups: str = '["text", "vision"]', dropout: float = 0.1, steps: int = 3, extra: str = "") -> Path:
    return write_recipe(path, source, world, trainable, template="eve", steps=steps,
                        extra=extra + "\n" + LORA.format(dropout=dropout, groups=groups))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vlm_dir, tiny_world_dir) -> Trainer:
    """3 LoRA steps on text and vision with the patch embedding trained fully, merged export."""
    root = tmp_path_factory.mktemp("lora")
    trainer = Trainer(load_recipe(lora_recipe(root / "r.toml", tiny_vlm_dir, tiny_world_dir)), root / "run",
                      show_progress=False)
    trainer.train()
    return trainer


def test_only_adapters_and_listed_groups_change(trained, tiny_vlm_dir):
    base = EVEForCausalLM.from_pretrained(tiny_vlm_dir).state_dict()
    groups = parameter_groups(trained.model)
    assert set(trained.trainable) == {"patch_embed", "lora"}
    assert sorted({p.requires_grad for _, p in groups["lora"] + groups["patch_embed"]}) == [True]
    assert not any(p.requires_grad for g in ("text", "vision", "embeddings") for _, p in groups[g])
    adapted = {name.removesuffix(".lora_A.default.weight") for name, _ in groups["lora"] if ".lora_A." in name}
    assert len(adapted) == 2 * (4 + 3) * 2  # layers x (q, k, v, o + gate, up, down) x (text, vision)
    assert any(".vision_" in name for name in adapted) and any(".vision_" not in name for name in adapted)
    for name, p in trained.model.state_dict().items():
        if ".lora_" in name:
            continue
        original = base[name.replace(".base_layer.", ".")]
        if name.startswith("model.patch_embed."):
            assert not torch.equal(p, original), name
        else:
            assert torch.equal(p, original), name
    # they learned (B starts at 0), all but those only image tokens of the last layer run, which no loss term sees
    still = {name.removesuffix(".lora_B.default.weight") for name, p in groups["lora"]
             if ".lora_B." in name and not p.abs().sum()}
    last = trained.model.model.layers[-1]
    names = {id(m): n for n, m in trained.model.named_modules()}
    assert still == {names[id(m)] for m in (last.self_attn.vision_q_proj, last.self_attn.vision_o_proj,
                                            last.vision_mlp.gate_proj, last.vision_mlp.up_proj,
                                            last.vision_mlp.down_proj)}
    # the merged export: the adapted linear layers and the patch embedding changed, nothing else
    diff = changed(weights(tiny_vlm_dir), weights(trained.output / "export"))
    assert {k.removesuffix(".weight") for k in diff if not k.startswith("model.patch_embed.")} == adapted - still
    assert any(k.startswith("model.patch_embed.") for k in diff)


def test_merged_export_equals_adapters_on_the_base_and_the_trained_model(trained, tiny_vlm_dir, tmp_path):
    spec = dataclasses.replace(trained.recipe.lora, export="adapters")
    export_lora(trained.model.state_dict(), trained.model.config, spec, ["patch_embed"], str(tiny_vlm_dir),
                tmp_path / "adapters")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapters").iterdir()}
    merged = EVEForCausalLM.from_pretrained(trained.output / "export").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    ids[:, 1] = merged.config.image_token_index
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 32, 64, generator=g)]
    base = EVEForCausalLM.from_pretrained(tiny_vlm_dir).eval()
    trained.model.eval()
    with torch.no_grad():
        expected = merged(input_ids=ids, images=images).logits
        assert (base(input_ids=ids, images=images).logits - expected).abs().max() > 1e-3
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapters").eval()  # adapters go into `base`
        torch.testing.assert_close(adapted(input_ids=ids, images=images).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(trained.model(input_ids=ids, images=images).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # a training subprocess
def test_sigkill_then_resume_equals_uninterrupted(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """With adapter dropout, so that the resumed RNG state matters too."""
    recipe = lora_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, steps=5,
                         extra="[checkpoint]\nevery = 1\nkeep_last = 2")
    Trainer(load_recipe(recipe), tmp_path / "ref", show_progress=False).train()
    sigkill_after_checkpoint(recipe, tmp_path / "killed", step=2)
    Trainer(load_recipe(recipe), tmp_path / "killed", resume=True, show_progress=False).train()
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # bit-exact on CPU
    assert not changed(weights(tmp_path / "ref" / "export"), weights(tmp_path / "killed" / "export"))


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """Sharded meta-device loading gives every rank the adapters one process draws; bidirectional image attention
    set by the recipe goes through the same path."""
    recipe = lora_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, trainable='["patch_embed", "embeddings"]',
                         dropout=0.0)
    overrides = ["model.image_attention=bidirectional"]
    Trainer(load_recipe(recipe, overrides), tmp_path / "one", show_progress=False).train()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "evev2.cli", "train", "--recipe", str(recipe), "--output", str(tmp_path / "two"), *overrides],
                   env=env, check=True, capture_output=True, timeout=300)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
    torch.testing.assert_close(weights(tmp_path / "two" / "export"), weights(tmp_path / "one" / "export"),
                               rtol=0, atol=WEIGHT_ATOL)
    assert EVEForCausalLM.from_pretrained(tmp_path / "two" / "export").config.image_attention == "bidirectional"


@pytest.mark.parametrize("override,message", [
    ('lora.groups=["text", "vision"]', r"lora.groups and train.trainable both name \['text'\]"),
    ('lora.groups=["embeddings"]', r"lora.groups: unknown or empty groups \['embeddings'\]"),
    ("lora.rank=0", "rank and alpha must be positive"),
    ("lora.export=zip", "lora.export: must be one of"),
    ("lora.ranks=4", "lora.ranks: unknown field"),
])
def test_malformed_lora_section_names_the_field(tmp_path, tiny_world_dir, override, message):
    recipe = lora_recipe(tmp_path / "r.toml", Path("x"), tiny_world_dir, trainable='["text"]', groups='["vision"]')
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, [override])


def test_recipe_rules_and_record(tmp_path, tiny_world_dir):
    recipe = lora_recipe(tmp_path / "r.toml", Path("x"), tiny_world_dir, trainable="[]", groups='["text"]')
    spec = load_recipe(recipe, ["lora.export=adapters", "optim.group_lr.lora=1e-3"])
    assert spec.train.trainable == [] and spec.lora.groups == ["text"] and spec.model.image_attention is None
    with pytest.raises(RecipeError, match="train.trainable: unknown or empty"):
        load_recipe(write_recipe(tmp_path / "plain.toml", Path("x"), tiny_world_dir, "[]"))
    with pytest.raises(RecipeError, match="optim.group_lr: unknown groups \\['lora'\\]"):
        load_recipe(write_recipe(tmp_path / "plain.toml", Path("x"), tiny_world_dir, '["text"]'),
                    ["optim.group_lr.lora=1e-3"])
    with pytest.raises(RecipeError, match="adapter folder holds adapters"):
        load_recipe(recipe, ["lora.export=adapters", 'train.trainable=["vision"]'])
    with pytest.raises(RecipeError, match="model.image_attention"):
        load_recipe(recipe, ["model.image_attention=full"])
    from evev2.train.record import RESOLVED_RECIPE, write_run_record

    for overrides in ([], ["model.image_attention=bidirectional"]):  # unset fields are left out, and load back unset
        spec = load_recipe(recipe, overrides)
        write_run_record(tmp_path / "run", spec, world_size=1, device="cpu")
        assert load_recipe(tmp_path / "run" / RESOLVED_RECIPE) == spec
    plain = load_recipe(write_recipe(tmp_path / "plain.toml", Path("x"), tiny_world_dir, '["text"]'))
    write_run_record(tmp_path / "plain", plain, world_size=1, device="cpu")
    assert "lora" not in (tmp_path / "plain" / RESOLVED_RECIPE).read_text()
    assert load_recipe(tmp_path / "plain" / RESOLVED_RECIPE) == plain
