"""Conversion: Qwen2 -> EVEv2 (clones), and the official EVEv2 format <-> ours, checked against an independent
re-implementation of the official forward written from the documented facts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from evev2.cli import main as cli
from evev2.model import EVEForCausalLM
from evev2.model.convert import convert_llm, convert_official
from evev2.model.weights import iter_safetensors
from tests.conftest import TINY

H, I, V, LAYERS, HEADS, KV, W = 32, 64, 128, 2, 4, 2, 16  # hidden, intermediate, vocab, layers, heads, kv heads, patch width
HD = H // HEADS


def official_fixture(folder, seed=0):
    """An official-format EVEv2 checkpoint (the official key names), two shards + index."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g, dtype=torch.float64) * s  # noqa: E731
    t = {"model.embed_tokens.weight": r(V, H, s=1.0), "model.norm.weight": 1 + r(H), "lm_head.weight": r(V, H),
         "model.vision_tower.patch_embedding.0.weight": r(W, 3, 16, 16, s=0.05),
         "model.vision_tower.patch_embedding.0.bias": r(W), "model.vision_tower.patch_embedding.2.weight": r(H, W, 2, 2),
         "model.vision_tower.patch_embedding.2.bias": r(H), "model.vision_tower.class_embedding": r(H, s=1.0),
         "model.vision_tower.split_embedding": r(H, s=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for pre in ("", "moe_"):
            for n, shape in (("q", (HEADS * HD, H)), ("k", (KV * HD, H)), ("v", (KV * HD, H))):
                t[f"{p}self_attn.{pre}{n}_proj.weight"] = r(*shape)
                t[f"{p}self_attn.{pre}{n}_proj.bias"] = r(shape[0])
            t[f"{p}self_attn.{pre}o_proj.weight"] = r(H, HEADS * HD)
            mlp = f"{p}{pre}mlp."
            t[mlp + "gate_proj.weight"], t[mlp + "up_proj.weight"], t[mlp + "down_proj.weight"] = r(I, H), r(I, H), r(H, I)
            t[f"{p}{pre}input_layernorm.weight"] = 1 + r(H)
            t[f"{p}{pre}post_attention_layernorm.weight"] = 1 + r(H)
    keys = sorted(t)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    folder.mkdir(parents=True)
    for name, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    config = {"model_type": "eve-qwen2", "architectures": ["EVEQwen2ForCausalLM"], "vocab_size": V, "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "max_position_embeddings": 512, "add_moe": True, "moe_part": "layernorm-self_attn-mlp",
              "mm_hidden_size": W, "mm_vision_tower": "openai/eve-anyratio-res1600-patch16", "tune_MOE": True}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text("{}")
    return t


def official_forward(t, ids, image):
    """The official formulation, from the documented facts: per-image convs, both weight copies on every token blended
    by a float mask, one causal attention with 1-D RoPE over the spliced sequence, full logits. float64, batch 1."""
    x = torch.nn.functional.conv2d(image[None], t["model.vision_tower.patch_embedding.0.weight"],
                                   t["model.vision_tower.patch_embedding.0.bias"], stride=16)
    x = torch.nn.functional.gelu(x)
    x = torch.nn.functional.conv2d(x, t["model.vision_tower.patch_embedding.2.weight"],
                                   t["model.vision_tower.patch_embedding.2.bias"], stride=2)[0]  # (H, h, w)
    rows = [torch.cat([x[:, r].T, t["model.vision_tower.split_embedding"][None]]) for r in range(x.shape[1])]
    img = torch.cat([t["model.vision_tower.class_embedding"][None], *rows])
    at = int((ids == -200).nonzero()[0])
    emb = t["model.embed_tokens.weight"]
    h = torch.cat([emb[ids[:at]], img, emb[ids[at + 1:]]])
    m = torch.zeros(h.shape[0], 1, dtype=h.dtype)
    m[at:at + img.shape[0]] = 1
    L = h.shape[0]

    def rms(v, w):  # the Qwen2 RMSNorm computes in float32 whatever the input dtype (a downcast in a float64 run)
        v32 = v.float()
        return w * (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(v.dtype)

    # RoPE tables in float32, as HF Qwen2 and the official code build them, then used in float64
    inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    ang = torch.arange(L, dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos().double()[None], torch.cat([ang, ang], -1).sin().double()[None]
    lin = lambda key, v: v @ t[key + ".weight"].T + (t[key + ".bias"] if key + ".bias" in t else 0)  # noqa: E731
    for i in range(LAYERS):
        p = f"model.layers.{i}."

        def blend(name, fn):
            """text_module(x)*(1-m) + vision_module(x)*m, with the official `moe_` key of the vision copy."""
            vision = name.replace("self_attn.", "self_attn.moe_") if name.startswith("self_attn.") else "moe_" + name
            return fn(p + name) * (1 - m) + fn(p + vision) * m

        n1 = blend("input_layernorm", lambda k: rms(h, t[k + ".weight"]))
        q = blend("self_attn.q_proj", lambda k: lin(k, n1)).view(L, HEADS, HD).transpose(0, 1)
        k_ = blend("self_attn.k_proj", lambda k: lin(k, n1)).view(L, KV, HD).transpose(0, 1)
        v = blend("self_attn.v_proj", lambda k: lin(k, n1)).view(L, KV, HD).transpose(0, 1)
        q, k_ = apply_rotary_pos_emb(q[None], k_[None], cos, sin)
        k_, v = k_[0].repeat_interleave(HEADS // KV, 0), v.repeat_interleave(HEADS // KV, 0)
        scores = (q[0] @ k_.transpose(1, 2)) / math.sqrt(HD) + torch.full((L, L), float("-inf")).triu(1)
        a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(L, H)
        h = h + blend("self_attn.o_proj", lambda k: lin(k, a))
        n2 = blend("post_attention_layernorm", lambda k: rms(h, t[k + ".weight"]))
        mlp = lambda k: lin(k + ".down_proj", torch.nn.functional.silu(lin(k + ".gate_proj", n2)) * lin(k + ".up_proj", n2))  # noqa: E731,E501
        h = h + blend("mlp", mlp)
    return rms(h, t["model.norm.weight"]) @ t["lm_head.weight"].T


def test_official_checkpoint_gives_official_logits(tmp_path):
    tensors = official_fixture(tmp_path / "official")
    convert_official(tmp_path / "official", tmp_path / "ours")
    model = EVEForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float64).eval()
    assert model.config.modality_split == ["norm", "attn", "mlp"] and model.config.patch_hidden_size == W
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (10,), generator=g)
    ids[3] = -200
    image = torch.randn(3, 64, 96, generator=g, dtype=torch.float64)
    ours = model(input_ids=ids[None], images=[image]).logits[0]
    torch.testing.assert_close(ours, official_forward(tensors, ids, image), rtol=0, atol=1e-9)
    assert (tmp_path / "ours" / "tokenizer_config.json").exists()


def test_official_round_trip_is_identical(tmp_path):
    official_fixture(tmp_path / "official")
    cli(["convert", "official", str(tmp_path / "official"), str(tmp_path / "ours")])
    cli(["convert", "official", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "official"])
    a, b = dict(iter_safetensors(tmp_path / "official")), dict(iter_safetensors(tmp_path / "back"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["model_type"] == "eve-qwen2" and back["moe_part"] == "layernorm-self_attn-mlp" and back["add_moe"]
    assert back["mm_hidden_size"] == W
    with pytest.raises(FileExistsError):
        convert_official(tmp_path / "official", tmp_path / "ours")


@pytest.mark.parametrize("variant,split", [("v1.0", []), ("v1.5", ["mlp"]), ("v2.0", ["norm", "attn", "mlp"])])
def test_convert_llm_sharded_clones_text_weights(tiny_qwen2_dir, tmp_path, variant, split):
    qwen = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    sharded = tmp_path / "sharded"
    qwen.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    cli(["convert", "llm", str(sharded), str(tmp_path / "eve"), "--variant", variant, "--patch-hidden-size", "16"])
    model = EVEForCausalLM.from_pretrained(tmp_path / "eve").eval()
    assert model.config.modality_split == split
    state = model.state_dict()
    for name, p in state.items():
        if ".vision_" in name:
            assert torch.equal(p, state[name.replace("vision_", "")]), name
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    torch.testing.assert_close(model(input_ids=ids).logits, qwen(input_ids=ids).logits, rtol=0, atol=1e-5)
    n_vision = sum(".vision_" in k for k in load_file(next((tmp_path / "eve").glob("*.safetensors"))))
    assert (n_vision > 0) == bool(split)


def test_convert_llm_rejects_non_qwen(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="Qwen2-family"):
        convert_llm(tmp_path / "llama", tmp_path / "out")
