"""valign: a vision encoder → 2-layer MLP projector → decoder-only language model (arXiv 2503.19508).

The paper's idea lives in `attention_rule`, which `build_attention_mask` renders: inside `forward`, the language
model's attention is overridden so that the patch tokens of one image see each other in both directions
("hybrid"), everything sees everything ("bidirectional", alignment stage) or the usual causal mask applies
("causal"). The layout follows transformers' LLaVA (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`), which TRL's SFTTrainer and PEFT expect. This file is served as Hub remote
code and runs on transformers 4.57 and 5.x.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface, AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_valign import ATTN_MODES, CACHE_NAME, ValignConfig, cache_argument

# Kernels that take no arbitrary 4D mask: they would silently drop the image-bidirectional pattern.
KERNELS_WITHOUT_CUSTOM_MASKS = ("flash_attention_2", "flash_attention_3")
# The `attn_implementation` name of sdpa that attends packed samples one at a time (`per_sample_sdpa_attention`).
SDPA_PER_SAMPLE = "sdpa_per_sample"
IGNORE_INDEX = -100


def image_ids_of(image_mask: torch.Tensor, image_seq_length: int) -> torch.Tensor:
    """Index of the image each token belongs to within its row, or -1 for text tokens.

    Every image is exactly `image_seq_length` tokens long, so adjacent images stay distinct.
    """
    rank = image_mask.long().cumsum(-1) - 1
    return torch.where(image_mask, torch.div(rank, image_seq_length, rounding_mode="floor"), -1)


def document_ids_of(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed sample each token belongs to: a new sample starts wherever the position restarts at 0."""
    return (position_ids == 0).long().cumsum(-1)


MaskRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_rule(
    key_is_real: torch.Tensor,
    image_ids: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    mode: str,
    past_length: int,
) -> MaskRule:
    """valign's attention policy as a flex-attention `mask_mod`: whether query `q_idx` of row `b` may see key `kv_idx`.

    Query indices count within the current chunk, key indices over the cache and the chunk. Built on per-token
    tensors only, so it renders both as a dense mask (broadcast index grids) and as a `BlockMask` (flex's vmap).

    Args:
        key_is_real: `(batch, past_length + q)` bool, False at padding.
        image_ids: `(batch, past_length + q)` index of the image each key belongs to (-1: text, and every cached
            key), or None outside hybrid mode.
        document_ids: `(batch, q)` packed sample of each token (no KV cache), or None when a row holds one sample.
    """

    def allowed(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        query = q_idx + past_length
        visible = key_is_real[b, kv_idx]
        if mode != "bidirectional":
            order = kv_idx <= query
            if image_ids is not None:  # the patch tokens of one image see each other both ways
                query_image = image_ids[b, query]
                order = order | ((query_image >= 0) & (query_image == image_ids[b, kv_idx]))
            visible = visible & order
        if document_ids is not None:  # packed samples never see each other
            visible = visible & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        # A padding query row must see something, or softmax over a fully blocked row gives NaN.
        return visible | (kv_idx == query)

    return allowed


def dense_mask(rule: MaskRule, batch: int, q: int, kv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`rule` as a `(batch, 1, q, kv)` additive float mask (sdpa, eager): 0 where allowed, the dtype's minimum
    where blocked."""
    b = torch.arange(batch, device=device)[:, None, None]
    allowed = rule(b, None, torch.arange(q, device=device)[None, :, None], torch.arange(kv, device=device)[None, None])
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, blocked)[:, None]


def block_mask(rule: MaskRule, batch: int, q: int, kv: int, device) -> BlockMask:
    """`rule` as flex attention's `BlockMask`, which skips fully blocked blocks (other packed samples, padding)."""
    return create_block_mask(rule, batch, None, q, kv, device=device)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    image_mask: torch.Tensor | None,
    mode: str,
    past_length: int,
    image_seq_length: int,
    dtype: torch.dtype,
    document_ids: torch.Tensor | None = None,
    kernel: str = "sdpa",
) -> torch.Tensor | BlockMask | None:
    """The attention mask valign hands the language model (its policy is `attention_rule`).

    Args:
        attention_mask: `(batch, past_length + q)` padding mask, 1 for real tokens, or None (nothing padded).
        image_mask: `(batch, q)` True where the current tokens are image patches, or None when there are none.
        mode: "causal", "hybrid" or "bidirectional".
        past_length: number of tokens already in the KV cache (they are never image tokens of this chunk).
        document_ids: `(batch, q)` index of the packed sample of each token (no KV cache), or None when every row
            holds one sample. Tokens attend only within their own sample, in every mode.
        kernel: the language model's attention implementation: "flex_attention" gets a `BlockMask`, any other a
            dense mask.

    Returns:
        The 2D padding mask unchanged when the result is plain causal attention (the decoder builds it, with any
        attention kernel), else a `BlockMask` for flex attention or a `(batch, 1, q, past_length + q)` additive
        float mask: 0 where attention is allowed, the dtype's minimum where it is blocked.
    """
    if document_ids is None and (mode == "causal" or (mode == "hybrid" and image_mask is None)):
        return attention_mask
    batch, q = image_mask.shape if image_mask is not None else document_ids.shape
    device = (image_mask if image_mask is not None else document_ids).device
    kv = past_length + q
    if attention_mask is None:
        attention_mask = torch.ones(batch, kv, dtype=torch.bool, device=device)
    image_ids = None
    if mode == "hybrid" and image_mask is not None:
        image_ids = nn.functional.pad(image_ids_of(image_mask, image_seq_length), (past_length, 0), value=-1)
    rule = attention_rule(attention_mask.bool(), image_ids, document_ids, mode, past_length)
    if kernel == "flex_attention":
        return block_mask(rule, batch, q, kv, device)
    return dense_mask(rule, batch, q, kv, dtype, device)


def positions_from_padding(attention_mask: torch.Tensor | None, batch: int, q: int, past_length: int, device):
    """Position ids that skip left padding, so a padded row computes exactly what it would alone."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + q, device=device).expand(batch, q)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]


def may_be_packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bool:
    """transformers' padding-free convention (`DataCollatorWithFlattening`, TRL's `padding_free`): no attention
    mask, and position ids that restart at 0 where each packed sample begins."""
    return position_ids is not None and attention_mask is None


def packed_document_ids(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past_length: int
) -> torch.Tensor | None:
    """Sample index per token for padding-free packed rows (see `may_be_packed`), else None."""
    if not may_be_packed(position_ids, attention_mask) or past_length > 0:
        return None
    if not (position_ids[..., 1:] == 0).any():
        return None
    return document_ids_of(position_ids)


def sample_lengths_of(document_ids: torch.Tensor) -> list[list[int]]:
    """Lengths of the packed samples of each row, in order (`document_ids` as `document_ids_of` numbers them)."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in document_ids]


def per_sample_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sample_lengths: list[list[int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, run on each packed sample alone when `sample_lengths` (per row) is given.

    The dense mask already blocks attention between samples, so each sample's block of it is all that matters:
    sdpa over a whole row computes every block anyway, this computes the samples' own (a row of 4 similar samples:
    a quarter of the products). Same result; without `sample_lengths` it is sdpa itself.
    """
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if sample_lengths is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for q_row, k_row, v_row, mask_row, lengths in zip(
        query.unbind(), key.unbind(), value.unbind(), attention_mask.unbind(), sample_lengths, strict=True
    ):
        starts = itertools.accumulate(lengths, initial=0)
        samples = zip(q_row.split(lengths, 1), k_row.split(lengths, 1), v_row.split(lengths, 1), starts, lengths)
        rows.append(
            torch.cat(
                [
                    sdpa(module, q[None], k[None], v[None], mask_row[None, :, s : s + n, s : s + n], **kwargs)[0]
                    for q, k, v, s, n in samples
                ],
                dim=1,
            )
        )
    return torch.cat(rows), None


AttentionInterface.register(SDPA_PER_SAMPLE, per_sample_sdpa_attention)
AttentionMaskInterface.register(SDPA_PER_SAMPLE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def chunked_head_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The loss `ForCausalLMLoss` computes from `head(hidden)`, over supervised tokens only and `chunk_size` at a
    time: each chunk's logits are recomputed in the backward pass (activation checkpointing), so the vocabulary-wide
    fp32 logits of the whole batch never exist at once (`ValignConfig.loss_chunk_size`)."""
    supervised = targets != IGNORE_INDEX
    hidden, targets = hidden[supervised], targets[supervised]

    def chunk_loss(chunk: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(head(chunk).float(), chunk_targets, reduction="sum")

    chunks = zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True)
    total = sum(checkpoint(chunk_loss, chunk, chunk_targets, use_reentrant=False) for chunk, chunk_targets in chunks)
    if num_items_in_batch is None:  # the mean over this batch's supervised tokens
        return total / len(targets)
    if torch.is_tensor(num_items_in_batch):  # a Trainer's count over the accumulated batches
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def check_pixel_values(pixel_values: torch.Tensor, config: ValignConfig) -> None:
    """Refuse pixel values of the wrong shape, or holding NaN / Inf (every logit would be NaN without a word)."""
    vision = config.vision_config
    expected = (getattr(vision, "num_channels", 3), config.image_size, config.image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
            f"got {tuple(pixel_values.shape)}; preprocess images with the ValignProcessor"
        )
    # A traced graph (torch.export, torch.compile) cannot branch on values: its runner checks before running it.
    # One float32 sum per prefill (isfinite().all() costs ~15x more on CPU); it cannot overflow for pixel values.
    if not torch.compiler.is_compiling() and not torch.isfinite(pixel_values.sum(dtype=torch.float32)):
        raise ValueError("pixel_values hold NaN or infinite values")


def check_image_placeholders(image_mask: torch.Tensor, pixel_values: torch.Tensor | None, config: ValignConfig) -> None:
    """Refuse image tokens that are not one placeholder's worth per image: features would fill the wrong tokens."""
    if pixel_values is None:
        raise ValueError(f"input_ids hold {int(image_mask.sum())} image tokens but no pixel_values were given")
    num_images, per_image = pixel_values.shape[0], config.image_seq_length
    expected = num_images * per_image
    if torch.compiler.is_compiling():
        # A graph cannot branch on a count (`.item()` broke the compiled prompt into 4 graphs); it keeps an assertion
        # instead, without the counts. valign's runners call `check_images` before their graphs for the full error.
        torch._assert_async(image_mask.sum() == expected, "image tokens and images do not match")
        return
    num_tokens = int(image_mask.sum())
    if num_tokens != expected:
        raise ValueError(
            f"{num_images} image(s) need {expected} image tokens ({per_image} each), "
            f"but input_ids hold {num_tokens} (= {num_tokens / per_image:g} images' worth): "
            "every image needs exactly one placeholder"
        )


def check_images(input_ids: torch.Tensor, pixel_values: torch.Tensor | None, config: ValignConfig) -> None:
    """`forward`'s checks of the images, for the runners of traced graphs, which cannot branch on values."""
    image_mask = input_ids == config.image_token_id
    if pixel_values is not None or image_mask.any():
        check_image_placeholders(image_mask, pixel_values, config)
        check_pixel_values(pixel_values, config)


def pixel_shuffle(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """Space-to-depth on a square patch grid, as Idefics3, SmolVLM and nanoVLM compress image tokens.

    `(batch, side², width)` in row-major grid order → `(batch, (side / factor)², width · factor²)`: each output token
    is one `factor × factor` block of neighbouring patches, its width their features concatenated row by row;
    blocks stay in row-major order. Factor 1 returns `patches` itself.
    """
    if factor == 1:
        return patches
    batch, length, width = patches.shape
    side = math.isqrt(length)
    if side * side != length or side % factor:
        raise ValueError(
            f"pixel shuffle by {factor} needs a square grid with a side divisible by it, got {length} patches"
        )
    blocks = side // factor
    grid = patches.reshape(batch, blocks, factor, blocks, factor, width)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, blocks * blocks, factor * factor * width)


def unwrap_vision_encoder(model: nn.Module) -> nn.Module:
    """The encoder itself, whichever transformers major built it.

    transformers 4.x nests SigLIP/CLIP encoders one level deeper (`SiglipVisionModel.vision_model`) than 5.x does.
    Holding the inner module gives the same parameter names under both majors, so checkpoints load across them.
    """
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model


def encoder_hidden_state(encoder: nn.Module, pixel_values: torch.Tensor, index: int, **encoder_kwargs) -> torch.Tensor:
    """`hidden_states[index]` of a vision encoder (0: the first layer's input, i ≥ 1: layer i's output), caught by
    a hook on its layer: transformers 4.x's inner encoders, which valign holds, do not return hidden states."""
    blocks = encoder.encoder
    layers = blocks.layers if hasattr(blocks, "layers") else blocks.layer  # CLIP/SigLIP name it layers, DINOv2 layer
    if not -len(layers) - 1 <= index <= len(layers):
        raise ValueError(f"vision_feature_layer={index} is out of range for a {len(layers)}-layer vision encoder")
    position = index % (len(layers) + 1)
    caught: list[torch.Tensor] = []
    if position == 0:
        handle = layers[0].register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    else:
        handle = layers[position - 1].register_forward_hook(
            lambda module, args, output: caught.append(output[0] if isinstance(output, tuple) else output)
        )
    try:
        encoder(pixel_values, **encoder_kwargs)
    finally:
        handle.remove()
    return caught[0]


@dataclass
class ValignModelOutputWithPast(BaseModelOutputWithPast):
    """The decoder's output plus the projected image features (`(num_images, image_seq_length, width)`)."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class ValignCausalLMOutputWithPast(CausalLMOutputWithPast):
    """The language-model head's output plus the projected image features."""

    image_hidden_states: torch.FloatTensor | None = None


class ValignMultiModalProjector(nn.Module):
    """Two linear layers with an activation between them: image-token width (the vision width × the pixel-shuffle
    factor²) → projector width → text width; with `standardize_vision_features`, each input dimension is first
    standardised with statistics kept as buffers (identity until `calibrate_vision_features` sets them)."""

    def __init__(self, config: ValignConfig) -> None:
        super().__init__()
        in_features = config.vision_config.hidden_size * config.pixel_shuffle_factor**2
        self.standardize = config.standardize_vision_features
        if self.standardize:
            self.register_buffer("feature_mean", torch.zeros(in_features))
            self.register_buffer("feature_std", torch.ones(in_features))
        self.linear_1 = nn.Linear(in_features, config.projector_hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            vision_features = (vision_features - self.feature_mean) / self.feature_std
        return self.linear_2(self.act(self.linear_1(vision_features)))


class ValignPreTrainedModel(PreTrainedModel):
    config_class = ValignConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True  # where no 4D mask is needed (causal, decode steps); forward refuses it otherwise
    _supports_flex_attn = True  # every mode: the mask is rendered as a BlockMask (build_attention_mask)
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ValignMultiModalProjector):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            if module.standardize:
                nn.init.zeros_(module.feature_mean)
                nn.init.ones_(module.feature_std)
        else:
            super()._init_weights(module)


class ValignModel(ValignPreTrainedModel):
    def __init__(self, config: ValignConfig) -> None:
        super().__init__(config)
        self.vision_tower = unwrap_vision_encoder(AutoModel.from_config(config.vision_config))
        self.multi_modal_projector = ValignMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.language_model = decoder

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Project images `(n, channels, size, size)` to language-model embeddings `(n, image_seq_length, width)`."""
        return self.multi_modal_projector(self.get_vision_features(pixel_values))

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the projector reads: the patch tokens of `vision_feature_layer` for images `(n, channels, size,
        size)`, pixel-shuffled to `(n, image_seq_length, vision width × pixel_shuffle_factor²)`."""
        check_pixel_values(pixel_values, self.config)
        layer = self.config.vision_feature_layer
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixel_values = pixel_values.to(dtype)
        kwargs = self._encoder_resolution_kwargs()
        if layer == -1:
            hidden = self.vision_tower(pixel_values, **kwargs).last_hidden_state
        else:
            hidden = encoder_hidden_state(self.vision_tower, pixel_values, layer, **kwargs)
        patches = hidden[:, -(self.config.image_grid_size**2) :]  # drop leading CLS / register tokens
        return pixel_shuffle(patches, self.config.pixel_shuffle_factor)

    def _encoder_resolution_kwargs(self) -> dict:
        """SigLIP and CLIP interpolate their position embeddings only when asked; DINOv2 always does."""
        if self.config.image_size == self.config.vision_config.image_size:
            return {}
        if "interpolate_pos_encoding" in inspect.signature(self.vision_tower.forward).parameters:
            return {"interpolate_pos_encoding": True}
        return {}

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def _check_attn_implementation(self, mode: str, packed: bool) -> None:
        """Called when a custom 4D mask was built: refuse kernels that would silently ignore it."""
        kernel = self.config.text_config._attn_implementation
        if kernel in KERNELS_WITHOUT_CUSTOM_MASKS:
            needs = "packed rows need" if packed else f"attn_mode={mode!r} needs"
            raise ValueError(
                f"{needs} a custom 4D attention mask, which {kernel!r} cannot apply; "
                "load the model with attn_implementation='sdpa' or 'eager'"
                + ("" if packed else ", or use attn_mode='causal'")
            )

    def attention_mask_for(
        self,
        image_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mode: str | None = None,
        past_length: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor | None:
        """The attention mask `forward` hands the language model (see `build_attention_mask`): `image_mask` is True
        at the image tokens of the current chunk (None: none), `attn_mode` defaults to the config's, and packed
        samples (padding-free position ids, no attention mask) stay apart. Refuses a kernel that would ignore it."""
        mode = attn_mode or self.config.attn_mode
        document_ids = packed_document_ids(position_ids, attention_mask, past_length)
        kernel = self.config.text_config._attn_implementation
        mask = build_attention_mask(
            attention_mask, image_mask, mode, past_length, self.config.image_seq_length, dtype, document_ids, kernel
        )
        if mask is not None and len(mask.shape) == 4:
            self._check_attn_implementation(mode, packed=document_ids is not None)
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        attn_mode: str | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ValignModelOutputWithPast:
        """`cache` is the KV cache (`past_key_values`, its name before transformers 5.24, is accepted too)."""
        cache = cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        mode = attn_mode or self.config.attn_mode
        if mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {mode!r}")
        past_length = cache.get_seq_length() if cache is not None else 0

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = self._image_token_mask(input_ids, inputs_embeds)
        image_features = None
        if pixel_values is not None or image_mask.any():
            check_image_placeholders(image_mask, pixel_values, self.config)
            image_features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], image_features)

        image_mask = image_mask if image_features is not None else None
        mask = self.attention_mask_for(image_mask, attention_mask, position_ids, mode, past_length, inputs_embeds.dtype)
        if self.config.text_config._attn_implementation == SDPA_PER_SAMPLE:
            document_ids = packed_document_ids(position_ids, attention_mask, past_length)
            if document_ids is not None:
                kwargs["sample_lengths"] = sample_lengths_of(document_ids)
        if position_ids is None:  # after the mask: given position ids may mark packed samples, derived ones never do
            batch, q = inputs_embeds.shape[:2]
            position_ids = positions_from_padding(attention_mask, batch, q, past_length, inputs_embeds.device)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return ValignModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class ValignForConditionalGeneration(ValignPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: ValignConfig) -> None:
        super().__init__(config)
        self.model = ValignModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"
        self.post_init()
        # Generating an image token would make the next step look like an image without pixels.
        self.generation_config.suppress_tokens = [config.image_token_id]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.model.language_model = decoder

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        attn_mode: str | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ValignCausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache; `past_key_values`, its name before transformers 5.24, is accepted too.
        labels (`torch.LongTensor` of shape `(batch, sequence)`, *optional*):
            Next-token targets, -100 where no loss is taken (prompt, image and padding tokens). The loss is the
            mean over supervised tokens; a batch without any raises instead of returning a meaningless 0 or NaN.
            With `logits_to_keep`, only the kept positions' targets count: the loss equals the full one when they
            include every position followed by a supervised token.
        attn_mode (`str`, *optional*):
            Overrides `config.attn_mode` for this call.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            attn_mode=attn_mode,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = outputs.last_hidden_state[:, keep, :]
        targets = None
        if labels is not None:
            if may_be_packed(position_ids, attention_mask):
                # Packed rows: a sample's first token is no target for the previous sample's last token.
                labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
            # Position p predicts token p + 1: the targets of the logits kept (all by default; a trainer may keep
            # only supervised positions, since the vocabulary-wide head is a large share of a small LM's step).
            targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)[:, keep]
            if not (targets != IGNORE_INDEX).any():
                raise ValueError("labels hold no supervised token (all -100 after the shift): nothing to learn from")

        chunk_size = self.config.loss_chunk_size
        if targets is not None and chunk_size and self.training and torch.is_grad_enabled():
            logits, loss = None, chunked_head_loss(self.lm_head, hidden, targets, chunk_size, num_items_in_batch)
        else:
            logits = self.lm_head(hidden)
            loss = None
            if targets is not None:
                loss = self.loss_function(
                    logits,
                    None,
                    self.config.text_config.vocab_size,
                    num_items_in_batch=num_items_in_batch,
                    shift_labels=targets.contiguous(),
                )
        return ValignCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(self, *args, pixel_values: torch.Tensor | None = None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = model_inputs.get(CACHE_NAME)
        # Images enter at prefill only; later steps read them from the KV cache (4.x would re-send them).
        if cache is None or cache.get_seq_length() == 0:
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    def generate(self, *args, attn_mode: str | None = None, **kwargs):
        """`GenerationMixin.generate`, refusing bidirectional attention.

        With bidirectional attention, earlier positions would attend to later tokens, which a KV cache cannot
        represent: decoding would silently differ from a full forward pass.
        """
        mode = attn_mode or self.config.attn_mode
        if mode == "bidirectional":
            raise ValueError(
                "generate() cannot use attn_mode='bidirectional' (it is not consistent with a KV cache); "
                "pass attn_mode='hybrid', the mode valign is fine-tuned and served with"
            )
        if attn_mode is not None:
            kwargs["attn_mode"] = attn_mode
        return super().generate(*args, **kwargs)


# save_pretrained then copies this file and its relative imports beside the weights (Hub remote code).
ValignModel.register_for_auto_class("AutoModel")
ValignForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
# That makes transformers 5 inspect `forward`'s signature at every decoding step (a check for remote code still
# taking `cache_position`); a precomputed signature answers it at once, saving ~70 µs per token.
ValignForConditionalGeneration.forward.__signature__ = inspect.signature(ValignForConditionalGeneration.forward)

__all__ = [
    "ValignForConditionalGeneration",
    "ValignModel",
    "ValignPreTrainedModel",
    "build_attention_mask",
    "pixel_shuffle",
]
