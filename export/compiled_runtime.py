"""valign in PyTorch with a static KV cache and compiled graphs: the fast CPU path (`--runtime compiled`).

Eager `generate` spends most of a decode step around the matrix products on a CPU (Python, a growing cache, one
kernel per operation): at the paper's shape on 2 cores it decoded at 98 ms a token in bf16 against a 24 ms floor
(BENCHMARKS.md). Here

- the prompt, images included, runs through `forward` exactly as eager generation runs it (one definition of the
  attention policy), into a dynamic cache whose keys and values are then written into a `StaticCache`;
- every later token runs the language model and its head as one graph compiled by inductor for the cache's fixed
  length, so a step is a few fused kernels;
- the vision tower is compiled too (images have one size).

`weights="int8"` stores the language model's and the head's linear weights as int8 with one scale per output channel
(torchao's `Int8WeightOnlyConfig`, made for inductor to fuse the dequantization into the matrix–vector products), so
a decode step reads half the bytes of bf16. Its tokens may differ from bf16's; `bench/export_agreement.py` measures
by how much.

Compiling costs tens of seconds for each new shape (batch size, cache-length bucket), once per process (inductor
caches its work on disk, so later processes compile faster): it pays over many generations, such as the app's or a
folder of images (see `export/runtime.py` for when `auto` takes it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from ..configuration_valign import CACHE_NAME
from ..modeling_valign import positions_from_padding
from .greedy import check_generation_config, check_greedy, decode_greedily

CACHE_BUCKET = 128  # cache lengths round up to a multiple of this, so prompts of similar length share one graph
WEIGHTS = ("native", "int8")


def quantize_language_model(model: nn.Module) -> None:
    """int8 weight-only language model and head (torchao; its other modules keep their dtype)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig(set_inductor_config=False)
    quantize_(model.model.language_model, config)
    quantize_(model.lm_head, config)


class CompiledValign:
    """A valign model whose `generate` decodes greedily, as `model.generate` does, through compiled graphs; it stands
    in for the model in `eval.generate.generate_answers` (the `valign` command and the app)."""

    def __init__(self, model: nn.Module, weights: str = "native") -> None:
        if CACHE_NAME != "cache":  # the StaticCache API used here (appending `update`) came with 5.24
            raise RuntimeError("the compiled runtime needs transformers 5.24 or newer; use the torch runtime")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        self.model = model.eval()
        self.config, self.generation_config, self.device = model.config, model.generation_config, model.device
        check_generation_config(self.generation_config, "the checkpoint", "compiled")
        if weights == "int8":
            quantize_language_model(model)
        model.model.vision_tower.compile(dynamic=False)
        self.decode_step = torch.compile(self._decode_step, dynamic=False)
        self.caches: dict[tuple[int, int], StaticCache] = {}

    def _decode_step(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        hidden = self.model.model.language_model(
            input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, **{CACHE_NAME: cache}
        ).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attn_mode: str | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        do_sample: bool = False,
    ) -> torch.Tensor:
        """Prompt and new tokens, `(batch, prompt + new)`, finished rows padded, as `generate` returns them."""
        mode = attn_mode or self.config.attn_mode
        check_greedy(mode, num_beams, do_sample, "compiled")
        batch, prompt = input_ids.shape
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        length = CACHE_BUCKET * math.ceil((prompt + max_new_tokens) / CACHE_BUCKET)
        cache = self.static_cache(batch, length)
        # One padding mask for every decode step, so each step reuses one graph: the slots after the prompt hold
        # the generated tokens, and causal attention hides those not written yet.
        step_mask = nn.functional.pad(prompt_mask, (0, length - prompt), value=1)

        def step(chunk: torch.Tensor, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
            if past == 0:
                return self.prefill(chunk, attention_mask, pixel_values, mode, cache)
            # A column sliced off the growing mask has a new stride every step, and a graph is compiled per stride.
            positions = positions_from_padding(attention_mask, batch, 1, past, self.device)
            positions = positions.clone(memory_format=torch.contiguous_format)
            return self.decode_step(chunk, positions, step_mask, cache)

        # Freezing makes the weights constants of the graphs, which inductor lays out for its kernels: decode steps
        # 1.35x faster at the paper's shape (BENCHMARKS.md). It is read when a graph compiles, i.e. within the calls
        # (`torch.compile(options=...)` did not apply it).
        with torch._inductor.config.patch(freezing=True):
            return decode_greedily(step, input_ids, attention_mask, self.generation_config, max_new_tokens)

    def static_cache(self, batch: int, length: int) -> StaticCache:
        """The emptied KV cache for `batch` rows of `length` tokens. One per shape, reused: a frozen graph holds its
        tensors as constants, so a new cache would be a stale one to the graph compiled with the old."""
        cache = self.caches.get((batch, length))
        if cache is None:
            cache = self.caches[batch, length] = StaticCache(config=self.config.text_config, max_cache_len=length)
        cache.reset()
        return cache

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        mode: str,
        cache: StaticCache,
    ) -> torch.Tensor:
        """The prompt's next-token logits from `forward`, its keys and values copied into `cache`."""
        prompt_cache = DynamicCache(config=self.config.text_config)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            attn_mode=mode,
            logits_to_keep=1,
            **{CACHE_NAME: prompt_cache},
        ).logits
        for layer, (keys, values, *_) in enumerate(prompt_cache):
            cache.update(keys, values, layer)
        return logits[:, -1]
