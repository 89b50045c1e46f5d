"""EVEv2 model: Qwen2 with modality-specific weights ("divide and conquer") and a patch embedding.

Data flow: images -> `EVEPatchEmbedding` (patch_embed.py) -> `splice_images` (splice.py) -> `EVEDecoderLayer` x N with a
shared `ModalityRouter` (routing.py) -> final norm -> `lm_head` on supervised positions only (loss) or on every position
(logits). Everything not listed here is imported from HF Qwen2 unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple

from evev2.constants import IGNORE_INDEX
from evev2.model.configuration_eve import EVEConfig
from evev2.model.loss import linear_cross_entropy_sum
from evev2.model.packed_attention import PackedSamples
from evev2.model.patch_embed import EVEPatchEmbedding
from evev2.model.reparam import GatedVisionDelta
from evev2.model.routing import ModalityRouter
from evev2.model.splice import SplicedInputs, is_left_padded, positions_from_segments, splice_images


def _vision_copy(config: EVEConfig, part: str, make: Callable[[], nn.Module]) -> nn.Module | None:
    return make() if part in config.modality_split else None


class EVEAttention(Qwen2Attention):
    """Qwen2 attention whose q/k/v/o have a vision copy; the softmax attention itself is shared by both modalities."""

    def __init__(self, config: EVEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        hd, heads, kv_heads, bias = self.head_dim, config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        if not bias:
            self.q_proj = nn.Linear(config.hidden_size, heads * hd, bias=False)
            self.k_proj = nn.Linear(config.hidden_size, kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(config.hidden_size, kv_heads * hd, bias=False)
        # main diff with Qwen2: vision copies of the four projections
        self.vision_q_proj = _vision_copy(config, "attn", lambda: nn.Linear(config.hidden_size, heads * hd, bias=bias))
        self.vision_k_proj = _vision_copy(config, "attn", lambda: nn.Linear(config.hidden_size, kv_heads * hd, bias=bias))
        self.vision_v_proj = _vision_copy(config, "attn", lambda: nn.Linear(config.hidden_size, kv_heads * hd, bias=bias))
        self.vision_o_proj = _vision_copy(config, "attn", lambda: nn.Linear(heads * hd, config.hidden_size, bias=False))

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,  # (N, D) stream layout
        router: ModalityRouter,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        packed: PackedSamples | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output in stream layout, attention weights (B, H, L, S) where the backend returns them (eager)).

        `packed`: SDPA sample by sample over packed rows, instead of `attention_mask`."""
        B, L = router.shape
        q = router.to_sequence(router(self.q_proj, self.vision_q_proj, hidden_states))  # (B, L, H*Hd)
        k = router.to_sequence(router(self.k_proj, self.vision_k_proj, hidden_states))  # (B, L, Hkv*Hd)
        v = router.to_sequence(router(self.v_proj, self.vision_v_proj, hidden_states))
        q = q.view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, H, L, Hd)
        k = k.view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Hd)
        v = v.view(B, L, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.attention_dropout if self.training else 0.0
        if packed is not None:
            out, weights = packed.attend(q, k, v, self.scaling, dropout), None  # (B, L, H*Hd)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                                     **kwargs)  # (B, L, H, Hd)
        out = router.to_stream(out.reshape(B, L, -1))  # (N, H*Hd)
        return router(self.o_proj, self.vision_o_proj, out), weights


class EVEDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Qwen2 block in which norms, attention projections and the MLP are routed by modality."""

    def __init__(self, config: EVEConfig, layer_idx: int):
        super().__init__()
        norm = lambda: Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        self.self_attn = EVEAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.vision_mlp = _vision_copy(config, "mlp", lambda: Qwen2MLP(config))
        self.vision_input_layernorm = _vision_copy(config, "norm", norm)
        self.vision_post_attention_layernorm = _vision_copy(config, "norm", norm)
        self.vision_mlp_delta = GatedVisionDelta(config) if config.vision_mlp_reparam else None  # EVEv1.2

    def forward(
        self,
        hidden_states: torch.Tensor,  # (N, D) stream layout
        router: ModalityRouter,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        packed: PackedSamples | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output in stream layout, the attention weights if the backend returns them)."""
        residual = hidden_states
        h = router(self.input_layernorm, self.vision_input_layernorm, hidden_states)
        attended, weights = self.self_attn(h, router, position_embeddings, attention_mask, cache, packed, **kwargs)
        hidden_states = residual + attended
        residual = hidden_states
        h = router(self.post_attention_layernorm, self.vision_post_attention_layernorm, hidden_states)
        vision_mlp = partial(self.vision_mlp_delta, self.mlp) if self.vision_mlp_delta is not None else self.vision_mlp
        return residual + router(self.mlp, vision_mlp, h), weights


class EVEPreTrainedModel(PreTrainedModel):
    config_class = EVEConfig
    config: EVEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EVEDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (EVEPatchEmbedding, GatedVisionDelta)):
            module.reset_parameters()
        elif not isinstance(module, nn.Conv2d):  # the only convs are the patch embedding's, handled above
            super()._init_weights(module)


class EVEModel(EVEPreTrainedModel):
    def __init__(self, config: EVEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.patch_embed = EVEPatchEmbedding(config)
        self.layers = nn.ModuleList(EVEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        images: list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> SplicedInputs:
        """Embed text and images into one spliced sequence per row (see `splice_images`)."""
        if padding_side is None:
            padding_side = "left" if attention_mask is not None and is_left_padded(attention_mask) else "right"
        text_embeds = self.embed_tokens(input_ids.clamp(min=0))  # placeholders are negative ids
        return splice_images(input_ids, self.patch_embed(images), text_embeds, self.config.image_token_index,
                             attention_mask, labels, padding_side)

    def blank_image_embedding(self) -> torch.Tensor:
        """A scalar that keeps the patch embedding in the graph with zero gradient on an image-free training batch.

        Like the router's `keep_both`: under FSDP2 every rank must reduce the same gradients, whether or not its
        micro-batch had images.
        """
        step = self.config.image_pixels_per_token
        blank = torch.zeros(3, step, step, device=self.embed_tokens.weight.device)
        return self.patch_embed([blank])[0].sum()

    def image_inputs(
        self,
        images: list[torch.Tensor] | None,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
    ) -> list[torch.Tensor] | None:
        """The images as the patch embedding takes them: `images` ([3, H, W] each) as given, or transformers-style
        `pixel_values` (P, 3 * u * u) + `image_sizes` (N, 2) unpacked, the inverse of `evev2.data.processor.pack_images`
        (u = `config.image_pixels_per_token`)."""
        if pixel_values is None:
            return images
        if images or image_sizes is None:
            raise ValueError("pass either images or pixel_values with image_sizes")
        u = self.config.image_pixels_per_token
        sizes = image_sizes.tolist()
        counts = [(h // u) * (w // u) for h, w in sizes]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches but image_sizes {sizes} make "
                             f"{sum(counts)} of {u}x{u} pixels")
        return [patches.view(h // u, w // u, 3, u, u).permute(2, 0, 3, 1, 4).reshape(3, h, w)
                for (h, w), patches in zip(sizes, pixel_values.split(counts))]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder.

        Either `input_ids` (+ `images`, or `pixel_values` + `image_sizes`, spliced here) or `inputs_embeds` (already
        spliced, with `mm_token_type_ids` saying which rows are image tokens, missing means all text, and `image_ids`
        which image each image token belongs to, needed under bidirectional image attention). `attention_mask`
        is (B, L) with 0 on padding and the packed-sample id elsewhere (1 everywhere for unpacked rows), or a
        cache-length 0/1 mask while decoding. `output_hidden_states`: the embeddings and every layer's output, in
        sequence order (the last one after the final norm), as for any HF decoder; `output_attentions` needs eager
        attention, the only backend that returns the weights.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(f"output_attentions needs eager attention, but this model runs "
                             f"{self.config._attn_implementation!r}, which returns no attention weights: load it with "
                             f"attn_implementation='eager' or call model.set_attn_implementation('eager')")
        images = self.image_inputs(images, pixel_values, image_sizes)
        if input_ids is not None:
            if images:
                s = self.embed_inputs(input_ids, images, attention_mask)
                inputs_embeds, attention_mask, mm_token_type_ids = s.inputs_embeds, s.attention_mask, s.mm_token_type_ids
                image_ids = s.image_ids
                position_ids = s.position_ids if position_ids is None else position_ids
            else:
                if (input_ids == self.config.image_token_index).any():
                    raise ValueError("input_ids contain image placeholders but no images were given")
                inputs_embeds = self.embed_tokens(input_ids)
                if self.training and torch.is_grad_enabled():
                    inputs_embeds = inputs_embeds + 0.0 * self.blank_image_embedding()
        B, L, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        packed = past == 0 and attention_mask is not None and bool((attention_mask > 1).any())
        if position_ids is None:
            if attention_mask is not None and past == 0:
                position_ids = positions_from_segments(attention_mask)
            else:
                position_ids = (torch.arange(L, device=inputs_embeds.device) + past).expand(B, L)
        text_only = mm_token_type_ids is None  # e.g. a decode step: the router skips its image-token count
        if text_only:
            mm_token_type_ids = torch.zeros(B, L, dtype=torch.long, device=inputs_embeds.device)

        blocks = self.image_blocks(image_ids, mm_token_type_ids, text_only, past, attention_mask)
        samples = None
        if packed and self.config._attn_implementation == "sdpa":
            samples, mask = PackedSamples.from_sample_ids(attention_mask, blocks), None  # SDPA sample by sample
        elif packed:  # block-diagonal causal: attention never crosses packed samples
            segments = attention_mask
            mask = create_causal_mask(self.config, inputs_embeds, segments >= 0, None, position_ids,
                                      and_mask_function=lambda b, h, q, kv: segments[b, q] == segments[b, kv],
                                      block_sequence_ids=blocks)
        else:
            mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids,
                                      block_sequence_ids=blocks)

        router = ModalityRouter(mm_token_type_ids.bool(), self.config.routing,
                                keep_both=self.training and torch.is_grad_enabled(), text_only=text_only)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden = router.to_stream(inputs_embeds)  # (N, D), stays in stream layout through all layers
        states, attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                states.append(router.to_sequence(hidden))  # what each layer reads; the first is the embeddings
            hidden, weights = layer(hidden, router, position_embeddings, mask, cache, samples, **kwargs)
            attentions.append(weights)
        last = router.to_sequence(self.norm(hidden))
        return BaseModelOutputWithPast(last_hidden_state=last, cache=cache if use_cache else None,
                                       hidden_states=(*states, last) if output_hidden_states else None,
                                       attentions=tuple(attentions) if output_attentions else None)

    def image_blocks(self, image_ids: torch.Tensor | None, mm_token_type_ids: torch.Tensor, text_only: bool,
                     past: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Under bidirectional image attention, HF's `block_sequence_ids` over the cached and new positions
        (B, past + L): tokens of one image share a block and see each other both ways, -1 (text, the cache) is causal.

        None under causal attention, and for text-only inputs (decode steps): their queries only ever look back.
        An image always sits entirely in one forward, so cached positions never share a block with new ones.
        """
        if self.config.image_attention == "causal" or text_only:
            return None
        if image_ids is None:
            if bool(mm_token_type_ids.any()):
                raise ValueError("bidirectional image attention needs image_ids (which image each token belongs to, "
                                 "from `embed_inputs`) with image tokens in inputs_embeds")
            return None
        if not (attention_mask is None or isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
            raise ValueError("bidirectional image attention builds its own mask: pass a 2D attention_mask, not a "
                             "prepared one (HF generate prepares a causal one for a static cache: use the default)")
        return torch.nn.functional.pad(image_ids - 1, (past, 0), value=-1)


class EVEForCausalLM(EVEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EVEConfig):
        super().__init__(config)
        self.model = EVEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward.

        Images come as `images` ([3, H, W] each) or as the processor's `pixel_values` + `image_sizes`.
        Without `labels`: logits for every spliced position (or the last `logits_to_keep`).
        With `labels` (aligned to `input_ids`, IGNORE_INDEX = -100 ignored; image tokens are ignored automatically): the
        shifted cross-entropy averaged over supervised positions (or summed and divided by `num_items_in_batch`, for
        gradient accumulation). `lm_head` then runs only on supervised positions and `logits` is None.
        `output_hidden_states` / `output_attentions` / `return_dict` behave as in `EVEModel.forward` and any HF model.
        """
        images = self.model.image_inputs(images, pixel_values, image_sizes)
        if images and input_ids is not None:
            s = self.model.embed_inputs(input_ids, images, attention_mask, labels)
            input_ids, inputs_embeds = None, s.inputs_embeds
            attention_mask, mm_token_type_ids, image_ids, labels = (s.attention_mask, s.mm_token_type_ids, s.image_ids,
                                                                    s.labels)
            position_ids = s.position_ids if position_ids is None else position_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, mm_token_type_ids=mm_token_type_ids, image_ids=image_ids,
                         use_cache=use_cache, return_dict=True, **kwargs)
        hidden = out.last_hidden_state  # (B, L, D)
        extra = dict(cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions)
        if labels is None:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            return CausalLMOutputWithPast(logits=logits, **extra)
        loss = self.supervised_loss(hidden, labels, attention_mask, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, **extra)

    def supervised_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy over supervised positions only; never predicts across packed samples."""
        targets = labels[:, 1:]  # (B, L-1): the token each position predicts
        keep = targets != IGNORE_INDEX
        if attention_mask is not None and attention_mask.shape == labels.shape:
            keep &= attention_mask[:, 1:] == attention_mask[:, :-1]
        h = hidden[:, :-1][keep]  # (M, D): only supervised rows reach the LM head, never image rows
        total = linear_cross_entropy_sum(h, self.lm_head.weight, targets[keep], self.config.loss_chunk_rows)
        denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        return total / denom

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF `generate`, with images (or the processor's `pixel_values` + `image_sizes`) spliced up front (left
        padding) and generated tokens routed as text.

        Returns the prompt ids followed by the new tokens, as for any decoder-only HF model.
        """
        images = self.model.image_inputs(images, pixel_values, image_sizes)
        if not images:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        s = self.model.embed_inputs(input_ids, images, attention_mask, padding_side="left")
        out = super().generate(inputs_embeds=s.inputs_embeds, attention_mask=(s.attention_mask > 0).long(),
                               mm_token_type_ids=s.mm_token_type_ids, image_ids=s.image_ids, **kwargs)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)
        return out

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        image_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """HF's, with `image_ids` (aligned with the prompt) passed to the prefill only: generated tokens are text."""
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length, cache, attention_mask,
                                                       inputs_embeds, is_first_iteration, **kwargs)
        if is_first_iteration:
            inputs["image_ids"] = image_ids
        return inputs

    @torch.no_grad()
    def clone_text_to_vision(self) -> None:
        """Make every vision copy an exact clone of its text twin (the paper's initialisation of the vision branch), and
        close every EVEv1.2 gate (g = 0), so that vision tokens see exactly the text weights."""
        for layer in self.model.layers:
            for text, vision in vision_pairs(layer):
                vision.load_state_dict(text.state_dict())
            if layer.vision_mlp_delta is not None:
                layer.vision_mlp_delta.tanh_gate.zero_()


def vision_pairs(layer: EVEDecoderLayer) -> list[tuple[nn.Module, nn.Module]]:
    """(text module, vision copy) pairs of one layer, for the modules the config splits."""
    a = layer.self_attn
    pairs = [(layer.mlp, layer.vision_mlp), (layer.input_layernorm, layer.vision_input_layernorm),
             (layer.post_attention_layernorm, layer.vision_post_attention_layernorm),
             (a.q_proj, a.vision_q_proj), (a.k_proj, a.vision_k_proj), (a.v_proj, a.vision_v_proj),
             (a.o_proj, a.vision_o_proj)]
    return [(t, v) for t, v in pairs if v is not None]


def vision_modules(layer: EVEDecoderLayer) -> list[nn.Module]:
    """Every vision-only module of one layer: the vision copies and the EVEv1.2 gated delta (the `vision` group)."""
    delta = [layer.vision_mlp_delta] if layer.vision_mlp_delta is not None else []
    return [vision for _, vision in vision_pairs(layer)] + delta
