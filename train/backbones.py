"""Tiny random backbones built offline, in the same on-disk form as the real Hub checkpoints.

`build_tiny_backbones` writes a SigLIP vision encoder (with its image processor) and a Qwen2 causal LM (with a
byte-level BPE tokenizer trained on the fly), each with `save_pretrained`, so that
`ValignForConditionalGeneration.from_backbones(vision_dir, text_dir)` runs the real loading code with no network.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
# Enough English for the offline demo's captions, questions and chat scaffolding.
DEFAULT_CORPUS = (
    "system user assistant a an the is are of in on at to and with there this that what which how many image photo",
    "picture describe caption briefly short detailed answer question one word yes no left right top bottom middle",
    "centre center corner background white black gray grey red green blue yellow orange purple brown teal circle",
    "square triangle rectangle star shape shapes color colour does contain show small large big two three",
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the Qwen2/GPT-2 scheme) with ChatML and image special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )


def image_processor_class() -> type:
    # transformers 5 names the PIL implementation separately; its default one needs torchvision.
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


def build_tiny_backbones(
    folder: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 32,
    text_width: int = 64,
    layers: int = 2,
    vision_layers: int | None = None,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    seed: int = 0,
    init_std: float = 0.2,
) -> tuple[Path, Path]:
    """Write `folder/vision` and `folder/text`; returns both paths.

    `init_std` is far above transformers' 0.02 so that random weights give peaked, input-dependent predictions:
    with near-uniform logits, greedy decoding repeats one token and comparisons between code paths prove little.
    """
    folder = Path(folder)
    transformers.set_seed(seed)
    vision_dir, text_dir = folder / "vision", folder / "text"
    vision_config = SiglipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers or layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    SiglipVisionModel(vision_config).save_pretrained(vision_dir)
    image_processor_class()(size={"height": image_size, "width": image_size}).save_pretrained(vision_dir)

    tokenizer = train_tokenizer(corpus)
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        initializer_range=init_std,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(text_config).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir
