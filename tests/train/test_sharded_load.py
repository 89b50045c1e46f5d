"""`build_training_model`: under torchrun (2 gloo ranks) the shards, buffers, forward, frozen groups and tied embeddings
are those of a plain `from_pretrained`, and no rank but 0 ever holds the whole model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evev2.model import EVEConfig, EVEForCausalLM
from evev2.train.groups import parameter_groups
from evev2.train.parallel import build_training_model
from tests.conftest import perturb_vision_weights, tiny_eve_config

pytestmark = pytest.mark.slow  # torchrun, 2 processes

WORKER = Path(__file__).with_name("sharded_load_worker.py")


def two_ranks(folder: Path, out: Path, trainable: list[str], *extra: str) -> list[dict]:
    """Run the worker on 2 CPU ranks; what each rank wrote."""
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(folder), str(out), "--trainable", *trainable, *extra],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def routed_dir(tmp_path_factory) -> Path:
    """A tiny EVEv2 folder with tied embeddings, vision weights unlike the text ones (so that routing bugs show), and
    the weights in several safetensors shards with an index, as large checkpoints come."""
    torch.manual_seed(0)
    model = EVEForCausalLM(tiny_eve_config(tie_word_embeddings=True))
    perturb_vision_weights(model)
    path = tmp_path_factory.mktemp("routed")
    model.save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, routed_dir) -> Path:
    """One row of random text around one 64x64 image (so both the text and the vision weights run)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (1, 10), generator=g)
    ids[0, 3] = EVEConfig.from_pretrained(routed_dir).image_token_index
    path = tmp_path_factory.mktemp("inputs") / "inputs.pt"
    torch.save((ids, [torch.randn(3, 64, 64, generator=g)]), path)
    return path


@pytest.fixture(scope="module")
def sharded(routed_dir, inputs, tmp_path_factory) -> list[dict]:
    return two_ranks(routed_dir, tmp_path_factory.mktemp("sharded") / "out", ["vision"], "--inputs", str(inputs))


@pytest.fixture(scope="module")
def plain(routed_dir) -> EVEForCausalLM:
    return EVEForCausalLM.from_pretrained(routed_dir, dtype=torch.float32).eval()


def test_shards_and_buffers_equal_a_plain_load(sharded, plain):
    for name, p in plain.named_parameters(remove_duplicate=False):
        halves = [r["shards"][name] for r in sharded]
        assert halves[0].shape[0] == -(-p.shape[0] // 2), name  # really sharded: rank 0 holds the first half
        assert torch.equal(torch.cat(halves), p.detach()), name
    buffers = dict(plain.named_buffers())
    assert set(buffers) == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    for r in sharded:
        assert set(r["buffers"]) == set(buffers)
        for name, b in buffers.items():
            assert torch.equal(r["buffers"][name], b), name


def test_forward_equals_a_plain_load(sharded, plain, inputs):
    ids, images = torch.load(inputs)
    with torch.no_grad():
        expected = plain(input_ids=ids, images=images).logits
    for r in sharded:
        torch.testing.assert_close(r["logits"], expected, rtol=0, atol=1e-5)


def test_frozen_groups_and_tied_embeddings_survive(sharded, plain):
    vision = [n for n, _ in parameter_groups(plain)["vision"]]
    for r in sharded:
        assert r["requires_grad"] == {n: n in vision for n, _ in plain.named_parameters(remove_duplicate=False)}
        assert r["trainable"] == {"vision": vision} and r["trainable_are_current"]
        assert r["tied"]


def test_one_process_loads_as_before(routed_dir, plain):
    model, trainable = build_training_model(routed_dir, torch.device("cpu"), "sdpa", ["patch_embed"], torch.float32,
                                            activation_checkpointing=False, compile=False)
    assert model.training and model.lm_head.weight is model.model.embed_tokens.weight
    patch_embed = [n for n, _ in parameter_groups(plain)["patch_embed"]]
    expected = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]) and p.requires_grad == (name in patch_embed), name
    assert list(trainable) == ["patch_embed"] and [n for n, _ in trainable["patch_embed"]] == patch_embed


def test_no_rank_but_0_holds_the_whole_model(tmp_path):
    """169M fp32 parameters (645 MiB) in small tensors (vocab 1024): rank 1's peak RSS grows by its half and one
    broadcast tensor (measured 0.58x the model), rank 0's by the whole checkpoint too (1.53x). `from_pretrained` on
    every rank, the path this replaces, grew rank 1 by 1.07x."""
    torch.manual_seed(0)
    model = EVEForCausalLM(tiny_eve_config(vocab_size=1024, hidden_size=1024, intermediate_size=2048,
                                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                           tie_word_embeddings=True))
    size_kb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
    model.save_pretrained(tmp_path / "big")
    del model
    ranks = two_ranks(tmp_path / "big", tmp_path / "out", ["vision"])
    assert ranks[0]["rss_growth_kb"] >= size_kb
    assert ranks[1]["rss_growth_kb"] < 0.7 * size_kb
