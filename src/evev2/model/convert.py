"""Checkpoint conversion, streamed tensor by tensor so that a 7B model never has to fit in memory twice.

* `convert_llm`: an HF Qwen2/Qwen2.5 folder -> an EVEv2 folder: a fresh patch embedding, and every vision copy an exact
  clone of its text twin (the paper's initialisation), so that stage 1 starts from the unchanged LLM.
* `merge_reparam`: an EVEv1.2 model (gated vision FFN deltas) -> the equivalent plain model with a vision MLP copy
  (EVEv1.5), whose vision MLP weights are `W + tanh(g) * dW`.
* `convert_official`: the official EVEv2 format (`model_type` "eve-qwen2", `moe_*` keys, `model.vision_tower.*`) <-> ours.
  One key table serves both directions.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

import torch

from transformers.initialization import no_init_weights

from evev2.model.configuration_eve import VARIANTS, EVEConfig
from evev2.model.modeling_eve import EVEForCausalLM
from evev2.model.patch_embed import EVEPatchEmbedding
from evev2.model.reparam import GatedVisionDelta
from evev2.model.weights import AtomicFolder, ShardWriter, iter_safetensors

# Keys of a text module -> the key of its vision copy, per `modality_split` entry.
_VISION_COPY = {
    "attn": (re.compile(r"(\.self_attn\.)([qkvo]_proj\.)"), r"\1vision_\2"),
    "mlp": (re.compile(r"(\.layers\.\d+\.)(mlp\.)"), r"\1vision_\2"),
    "norm": (re.compile(r"(\.layers\.\d+\.)((?:input|post_attention)_layernorm\.)"), r"\1vision_\2"),
}
# Official key pattern <-> our key pattern (the text weights keep stock Qwen2 names in both).
_OFFICIAL_KEYS = [
    (r"model.vision_tower.patch_embedding.0.", r"model.patch_embed.conv1."),
    (r"model.vision_tower.patch_embedding.2.", r"model.patch_embed.conv2."),
    (r"model.vision_tower.class_embedding", r"model.patch_embed.class_embedding"),
    (r"model.vision_tower.split_embedding", r"model.patch_embed.split_embedding"),
    (r".moe_", r".vision_"),
]
_OFFICIAL_PARTS = {"layernorm": "norm", "self_attn": "attn", "mlp": "mlp"}
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?|config\.json)$")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config and other non-weight files."""
    for p in Path(src).iterdir():
        if p.is_file() and not _WEIGHT_FILES.match(p.name):
            shutil.copy2(p, dst / p.name)


def _write_processor_files(dst: Path, max_size: int, resize_policy: str) -> None:
    """Image preprocessing and chat template of the new folder, so that `EVEProcessor.from_pretrained` loads it."""
    from evev2.data.image_processing import EVEImageProcessor
    from evev2.data.processor import write_processor_config

    EVEImageProcessor(max_size=max_size, resize_policy=resize_policy).save_pretrained(dst)
    write_processor_config(dst, "eve")


def _fresh_vision_weights(config: EVEConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The weights an LLM does not have: the patch embedding and, for EVEv1.2, every layer's gated delta (gate 0)."""
    torch.manual_seed(seed)
    module = EVEPatchEmbedding(config)  # constructed with the official initialisation
    fresh = {f"model.patch_embed.{k}": v for k, v in module.state_dict().items()}
    if config.vision_mlp_reparam:  # drawn after the patch embedding, which stays the same for every variant
        for i in range(config.num_hidden_layers):
            fresh.update({f"model.layers.{i}.vision_mlp_delta.{k}": v
                          for k, v in GatedVisionDelta(config).state_dict().items()})
    return {k: v.to(dtype) for k, v in fresh.items()}


def convert_llm(src: str | Path, dst: str | Path, variant: str = "v2.0", patch_hidden_size: int = 1024,
                seed: int = 0, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                image_attention: str = "causal") -> EVEConfig:
    """Turn a local HF Qwen2-family folder into an EVEv2 folder (see module docstring)."""
    src = Path(src)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    llm = json.loads((src / "config.json").read_text())
    if llm.get("model_type") not in ("qwen2", "evev2"):
        raise ValueError(f"{src} has model_type {llm.get('model_type')!r}; convert llm expects a Qwen2-family LLM")
    fields = {k: v for k, v in llm.items() if k not in ("model_type", "architectures", "transformers_version",
                                                      "auto_map", "dtype", "torch_dtype")}
    config = EVEConfig(**{**fields, "patch_hidden_size": patch_hidden_size, **VARIANTS[variant],
                          "image_attention": image_attention})
    config.architectures = ["EVEForCausalLM"]
    split = config.modality_split
    dtype = None
    with AtomicFolder(Path(dst), overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, tensor in iter_safetensors(src):
            dtype = dtype or tensor.dtype
            writer.add(key, tensor)
            for part in split:
                pattern, repl = _VISION_COPY[part]
                if pattern.search(key):
                    writer.add(pattern.sub(repl, key), tensor.clone())
        for key, tensor in _fresh_vision_weights(config, dtype or torch.float32, seed).items():
            writer.add(key, tensor)
        writer.close()
        config.save_pretrained(tmp)
        _copy_side_files(src, tmp)
        _write_processor_files(tmp, max_size=800, resize_policy="max_area")
    return config


@torch.no_grad()
def merge_reparam(model: EVEForCausalLM) -> EVEForCausalLM:
    """Fold every EVEv1.2 gated delta into a plain vision MLP copy with weights `W + tanh(g) * dW`.

    The result has "mlp" added to `modality_split` (an EVEv1.0-based v1.2 becomes EVEv1.5), computes the same function
    and costs the same per token; everything else is copied unchanged. Same dtype; eval/train mode kept.
    """
    if not model.config.vision_mlp_reparam:
        raise ValueError("merge_reparam expects an EVEv1.2 model (config.vision_mlp_reparam is False)")
    config = EVEConfig.from_dict({**model.config.to_dict(), "vision_mlp_reparam": False,
                                  "modality_split": [*model.config.modality_split, "mlp"]})
    state = {k: v for k, v in model.state_dict().items() if ".vision_mlp_delta." not in k}
    for i, layer in enumerate(model.model.layers):
        for name, weight in layer.vision_mlp_delta.effective_weights(layer.mlp).items():
            state[f"model.layers.{i}.vision_mlp.{name}.weight"] = weight
    with no_init_weights():  # every weight is loaded below
        merged = EVEForCausalLM(config).to(model.dtype)
    merged.load_state_dict(state, strict=True)
    return merged.train(model.training)


def merge_reparam_cli(src: Path, dst: Path, overwrite: bool = False) -> None:
    """Merge an EVEv1.2 model folder (gated vision FFN deltas) into the equivalent plain model (EVEv1.5) folder.

    Args:
        src: the EVEv1.2 model folder.
        dst: the output folder; written under a temporary name and renamed when complete.
        overwrite: replace dst if it exists.
    """
    merged = merge_reparam(EVEForCausalLM.from_pretrained(src, dtype="auto"))
    with AtomicFolder(Path(dst), overwrite) as tmp:
        merged.save_pretrained(tmp)
        _copy_side_files(src, tmp)
    print(f"wrote {dst}: vision copies of {merged.config.modality_split}")


def _rename(key: str, to: Literal["ours", "official"]) -> str:
    table = _OFFICIAL_KEYS if to == "ours" else [(b, a) for a, b in reversed(_OFFICIAL_KEYS)]
    for old, new in table:
        key = key.replace(old, new)
    return key


def official_config_to_ours(cfg: dict) -> EVEConfig:
    if cfg.get("model_type") != "eve-qwen2":
        raise ValueError(f"expected an official EVEv2 config (model_type 'eve-qwen2'), got {cfg.get('model_type')!r}")
    parts = cfg.get("moe_part", "") if cfg.get("add_moe") else ""
    split = [_OFFICIAL_PARTS[p] for p in parts.split("-") if p]
    drop = {"model_type", "architectures", "transformers_version", "auto_map", "add_moe", "moe_part", "mm_hidden_size",
            "mm_vision_tower", "tune_VE", "tune_LLM", "tune_MOE", "vision_tower_lr", "dtype", "torch_dtype"}
    fields = {k: v for k, v in cfg.items() if k not in drop and not k.startswith(("mm_", "tokenizer_", "tune_"))}
    config = EVEConfig(**fields, patch_hidden_size=cfg.get("mm_hidden_size", 1024), modality_split=split)
    config.architectures = ["EVEForCausalLM"]
    return config


def our_config_to_official(config: EVEConfig) -> dict:
    if config.vision_mlp_reparam:
        raise ValueError("the official EVEv2 format has no EVEv1.2 gated deltas; merge first (evev2 convert merge)")
    if config.image_attention != "causal":
        raise ValueError("the official EVEv2 code attends causally to image tokens; a model trained with "
                         f"image_attention={config.image_attention!r} would compute something else there")
    out = config.to_dict()
    for k in ("patch_size", "patch_merge", "patch_hidden_size", "modality_split", "vision_mlp_reparam", "routing",
              "image_token_index", "attention_bias", "image_attention", "transformers_version", "dtype"):
        out.pop(k, None)
    inverse = {v: k for k, v in _OFFICIAL_PARTS.items()}
    out.update(model_type="eve-qwen2", architectures=["EVEQwen2ForCausalLM"], add_moe=bool(config.modality_split),
               moe_part="-".join(inverse[p] for p in ("norm", "attn", "mlp") if p in config.modality_split),
               mm_hidden_size=config.patch_hidden_size, mm_vision_tower="openai/eve-anyratio-res1600-patch16")
    return out


def convert_official(src: str | Path, dst: str | Path, to: Literal["ours", "official"] = "ours",
                     overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Convert between the official EVEv2 checkpoint format and ours, in either direction, tensors unchanged."""
    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    with AtomicFolder(Path(dst), overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, tensor in iter_safetensors(src):
            writer.add(_rename(key, to), tensor)
        writer.close()
        _copy_side_files(src, tmp)
        if to == "ours":
            official_config_to_ours(cfg).save_pretrained(tmp)
            # the official inference preprocessing, so that converted checkpoints reproduce the official numbers
            _write_processor_files(tmp, max_size=1600, resize_policy="official_eval")
        else:
            if cfg.get("model_type") != EVEConfig.model_type:
                raise ValueError(f"--to official expects one of our folders (model_type 'evev2'), got {cfg.get('model_type')!r}")
            (tmp / "config.json").write_text(json.dumps(our_config_to_official(EVEConfig.from_dict(cfg)), indent=2))


def convert_llm_cli(src: Path, dst: Path, variant: Literal["v1.0", "v1.2", "v1.5", "v2.0"] = "v2.0",
                    patch_hidden_size: int = 1024, seed: int = 0, overwrite: bool = False,
                    image_attention: Literal["causal", "bidirectional"] = "causal") -> None:
    """Convert a local HF Qwen2/Qwen2.5 folder (safetensors, sharded or not) into an EVEv2 model folder.

    Args:
        src: the LLM folder (config.json + *.safetensors + tokenizer files).
        dst: the output folder; written under a temporary name and renamed when complete.
        variant: which modules get a vision copy: v1.0 none, v1.2 none but a gated vision delta on every MLP
            (zero gate), v1.5 the MLP, v2.0 norms + attention + MLP.
        patch_hidden_size: channels between the two patch-embedding convs (1024 in the paper).
        seed: seed of the patch embedding's random initialisation.
        overwrite: replace dst if it exists.
        image_attention: causal (EVEv2), or bidirectional: the tokens of one image also attend to each other both
            ways (text stays causal); a recipe's `model.image_attention` can switch it later.
    """
    config = convert_llm(src, dst, variant, patch_hidden_size, seed, overwrite, image_attention=image_attention)
    reparam = ", gated vision MLP deltas (EVEv1.2)" if config.vision_mlp_reparam else ""
    print(f"wrote {dst}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vision copies of {config.modality_split or 'nothing'}{reparam}, {config.image_attention} image attention")


def convert_official_cli(src: Path, dst: Path, to: Literal["ours", "official"] = "ours", overwrite: bool = False) -> None:
    """Convert an official EVEv2 checkpoint (model_type eve-qwen2) to our format, or back with --to official.

    Args:
        src: the source folder.
        dst: the output folder; written under a temporary name and renamed when complete.
        to: the target format.
        overwrite: replace dst if it exists.
    """
    convert_official(src, dst, to, overwrite)
    print(f"wrote {dst} ({to} format)")
