"""valign in PyTorch with a static KV cache and compiled graphs: the fast CPU path (`--runtime compiled`).

Eager `generate` spends most of a decode step around the matrix products on a CPU (Python, a growing cache, one
kernel per operation): at the paper's shape on 2 AMX cores it decoded at 100 ms a token in bf16 against a 36 ms floor
(BENCHMARKS.md). Here

- the prompt, images included, runs through `forward` (one definition of the attention policy) compiled by inductor
  as one graph per batch size and prompt length, the prompt left-padded to a multiple of `PROMPT_BUCKET` tokens so
  that questions of similar length share a graph; its keys and values are then written into a `StaticCache`;
- every later token runs the language model and its head as one graph compiled for the cache's fixed length, so a
  step is a few fused kernels.

`weights="int8"` gives the decode steps a copy of the language model and head whose linear weights are int8 with one
scale per output channel (torchao's `Int8WeightOnlyConfig`), so a step, which is bound by reading weights, reads half
the bytes of bf16; `weights="w8a8"` also quantizes each step's activations to int8 per token
(`Int8DynamicActivationInt8WeightConfig`), so inductor runs the products as int8 x int8 kernels: at the paper's
shape on 2 AMX cores a decode step took 17-19 ms against 41-48 ms weight-only and 50-52 ms in bf16 (BENCHMARKS.md).
The prompt keeps the float weights: it is bound by computing, and inductor's int8 weight-only kernels for many rows
ran the paper's 271-token prompt through the language model in 1.37 s against 0.16 s in bf16. Quantized tokens may
differ from bf16's; `bench/export_agreement.py` measures by how much.

Compiling costs tens of seconds for each new shape (batch size, prompt and cache-length buckets), once per process
(inductor caches its work on disk, so later processes compile faster): it pays over many generations, such as the
app's or a folder of images (see `export/runtime.py` for when `auto` takes it).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, StaticCache

from ..checkpoint import cpu_has_amx
from ..configuration_valign import CACHE_NAME
from ..modeling_valign import check_images, positions_from_padding
from .greedy import check_generation_config, check_greedy, decode_greedily

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this, so prompts of similar length share one graph
CACHE_BUCKET = 128  # cache lengths round up to a multiple of this, for the same reason
# Decode-step weights: as loaded, or int8 through torchao — weight-only (activations stay float), or with each
# step's activations quantized to int8 per token too, so the products run as int8 x int8 (AMX / VNNI kernels).
QUANTIZED = {"int8": "Int8WeightOnlyConfig", "w8a8": "Int8DynamicActivationInt8WeightConfig"}
WEIGHTS = ("native", *QUANTIZED)
AVAILABLE = CACHE_NAME == "cache"  # the StaticCache API used here (appending `update`) came with transformers 5.24
RECOMPILE_LIMIT = 64  # graphs per compiled function (dynamo's default, 8, would run later shapes eagerly, silently)


def quantized_copy(module: nn.Module, weights: str, share: nn.Module | None = None) -> nn.Module:
    """A copy of `module` whose linear layers are quantized as `weights` names (torchao); `share`, a submodule, is
    not copied."""
    import torchao.quantization

    config = getattr(torchao.quantization, QUANTIZED[weights])(set_inductor_config=False)
    module = copy.deepcopy(module, memo={} if share is None else {id(share): share})
    torchao.quantization.quantize_(module, config)
    return module


@contextlib.contextmanager
def decode_graph_settings(device: torch.device, weights: str, batch: int) -> Iterator[None]:
    """How a one-row decode step with float weights compiles on a CPU (read when its graph compiles): attention as
    plain products and a softmax that inductor fuses, rather than the flash kernel, and, with AMX, its products by
    inductor's C++ GEMM template, chosen by autotuning, rather than oneDNN's prepacked kernels. Paper shape, bf16,
    2 cores: with AMX (torch 2.13) a step took 50-52 ms by the template against 65-71 ms by oneDNN, compiling about
    40 s more; on an EPYC with AVX512-BF16 and no AMX, 24.6 ms by oneDNN against 54.9 ms by the template (torch
    2.13; 31.9 against 58.8 ms on 2.15; autotuning between both, 33.0 ms). oneDNN also keeps 8 rows (82 against
    77 ms a step with AMX), the prompt (2.2x faster on its 256-row products) and int8 weights (torchao's kernels;
    the template found no choice for w8a8's at the paper's shape)."""
    if device.type != "cpu" or weights != "native" or batch != 1:
        yield
        return
    template = torch._inductor.config.patch(max_autotune=True, max_autotune_gemm_backends="CPP")
    with template if cpu_has_amx() else contextlib.nullcontext(), sdpa_kernel(SDPBackend.MATH):
        yield


class CompiledValign:
    """A valign model whose `generate` decodes greedily, as `model.generate` does, through compiled graphs; it stands
    in for the model in `eval.generate.generate_answers` (the `valign` command and the app)."""

    fixed_batch = True  # graphs are compiled per batch size: `generate_answers` fills a last, smaller batch up

    def __init__(self, model: nn.Module, weights: str = "native") -> None:
        if not AVAILABLE:
            raise RuntimeError("the compiled runtime needs transformers 5.24 or newer; use the torch runtime")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        self.model, self.weights = model.eval(), weights
        self.config, self.generation_config, self.device = model.config, model.generation_config, model.device
        check_generation_config(self.generation_config, "the checkpoint", "compiled")
        self.decoder, self.decoder_head = model.model.language_model, model.lm_head
        if weights in QUANTIZED:
            self.decoder = quantized_copy(self.decoder, weights, share=self.decoder.get_input_embeddings())
            self.decoder_head = quantized_copy(self.decoder_head, weights)
        self.prompt_step = torch.compile(self._prompt_step, dynamic=False)
        self.decode_step = torch.compile(self._decode_step, dynamic=False)
        self.caches: dict[tuple[int, int], StaticCache] = {}

    def _decode_step(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        hidden = self.decoder(
            input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, **{CACHE_NAME: cache}
        ).last_hidden_state
        return self.decoder_head(hidden[:, -1])

    def _prompt_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None, mode: str
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The prompt's next-token logits from `forward`, and each layer's keys and values."""
        cache = DynamicCache(config=self.config.text_config)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            attn_mode=mode,
            logits_to_keep=1,
            **{CACHE_NAME: cache},
        ).logits
        return logits[:, -1], [(layer.keys, layer.values) for layer in cache.layers]

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
        check_images(input_ids, pixel_values, self.config)  # a compiled `forward` skips its value checks
        batch = input_ids.shape[0]
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        padding = -input_ids.shape[1] % PROMPT_BUCKET
        input_ids = nn.functional.pad(input_ids, (padding, 0), value=self.generation_config.pad_token_id or 0)
        prompt_mask = nn.functional.pad(prompt_mask, (padding, 0), value=0)
        prompt = input_ids.shape[1]
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
            with decode_graph_settings(self.device, self.weights, batch):
                return self.decode_step(chunk, positions, step_mask, cache)

        # Freezing makes the weights constants of the graphs, which inductor lays out for its kernels: decode steps
        # 1.35x faster at the paper's shape (BENCHMARKS.md). It is read when a graph compiles, i.e. within the calls
        # (`torch.compile(options=...)` did not apply it).
        with (
            torch._inductor.config.patch(freezing=True),
            torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
        ):
            tokens = decode_greedily(step, input_ids, prompt_mask, self.generation_config, max_new_tokens)
        return tokens[:, padding:]

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
        """The prompt's next-token logits, its keys and values written into `cache`."""
        logits, keys_and_values = self.prompt_step(input_ids, attention_mask, pixel_values, mode)
        for layer, (keys, values) in enumerate(keys_and_values):
            cache.update(keys, values, layer)
        return logits
