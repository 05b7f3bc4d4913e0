"""Tiny random backbones built offline, in the same on-disk form as the real Hub checkpoints.

`build_tiny_backbones` writes a vision encoder (with its image processor) and a causal LM (with a byte-level BPE
tokenizer trained on the fly), each with `save_pretrained`, so that
`valign.from_backbones(vision_dir, text_dir)` runs the real loading code with no network.

By default it writes a SigLIP encoder and a Qwen2 LM whose tokenizer already pads left and has valign's tokens.
`vision=` and `text=` pick folders shaped like real backbones instead, in the ways valign has to adapt to:

- `vision="clip"` (openai/clip-vit-*): a CLS token; the processor resizes the shortest edge, then crops.
- `vision="dinov2"` (facebook/dinov2-*): a CLS token; the config's `image_size` is twice the processor's crop
  (the real ones declare 518 px and crop 224). `"dinov2-registers"` adds 4 register tokens after the CLS token.
- `text="qwen2.5"` (Qwen2.5-0.5B-Instruct): Qwen's pipeline and 13 additional special tokens after the vocabulary,
  right padding, a chat template with a default system prompt, and more embedding rows than tokens.
- `text="smollm2"` (SmolLM2-135M-Instruct): a Llama LM whose tokenizer has no image or vision tokens (valign adds
  one), pads right with pad = eos, and has a chat template with a default system prompt.

Both tokenizers' files are written by hand in the form the Hub serves them (saved by transformers 4.x), so they
are the same whichever transformers major builds them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
# Enough English for the offline demo's captions, questions and chat scaffolding.
DEFAULT_CORPUS = (
    "system user assistant a an the is are of in on at to and with there this that what which how many image photo",
    "picture describe caption briefly short detailed answer question one word yes no left right top bottom middle",
    "centre center corner background white black gray grey red green blue yellow orange purple brown teal circle",
    "square triangle rectangle star shape shapes color colour does contain show small large big two three",
)
VISION_KINDS = ("siglip", "clip", "dinov2", "dinov2-registers")
TEXT_KINDS = ("tiny", "qwen2.5", "smollm2")

# Qwen2.5-0.5B-Instruct: these follow the BPE vocabulary (ids 151643...) and the embeddings have 151936 rows.
QWEN_ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen's template (tools left out) injects a default system prompt: a processor that used it would show it.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# SmolLM2-135M-Instruct: its special tokens come first (ids 0...); only two are "additional".
SMOLLM2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>"]
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


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


def _byte_level_bpe(corpus: Iterable[str], pre_tokenizer, vocab_size: int, specials_first: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials_first, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _write_tokenizer(folder: Path, tokenizer: Tokenizer, config: dict) -> None:
    """tokenizer.json and a hand-written tokenizer_config.json (5.x would write another form than the Hub's)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {"added_tokens_decoder": added, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_qwen_tokenizer(folder: Path, corpus: Iterable[str], vocab_size: int = 512) -> None:
    """Qwen2.5-0.5B-Instruct's tokenizer in small: its pipeline, special tokens, padding side and chat template."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer = _byte_level_bpe(corpus, pre_tokenizer, vocab_size, specials_first=[])
    tokenizer.normalizer = normalizers.NFC()
    specials = ["<|endoftext|>", *QWEN_ADDITIONAL_SPECIAL_TOKENS]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    _write_tokenizer(
        folder,
        tokenizer,
        {
            "additional_special_tokens": QWEN_ADDITIONAL_SPECIAL_TOKENS,
            "bos_token": None,
            "chat_template": QWEN_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },  # no padding_side: transformers' default, right
    )


def write_smollm2_tokenizer(folder: Path, corpus: Iterable[str], vocab_size: int = 512) -> None:
    """SmolLM2-135M-Instruct's tokenizer in small: no image or vision tokens, pad = eos, padding on the right."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer = _byte_level_bpe(corpus, pre_tokenizer, vocab_size, specials_first=SMOLLM2_SPECIAL_TOKENS)
    _write_tokenizer(
        folder,
        tokenizer,
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": "<|im_start|>",
            "chat_template": SMOLLM2_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": 8192,
            "pad_token": "<|im_end|>",
            "padding_side": "right",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
        },
    )


def image_processor_class(family: str = "Siglip") -> type:
    # transformers 5 names the PIL implementation separately; its default one needs torchvision.
    return getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(transformers, f"{family}ImageProcessor")


def write_vision_encoder(
    folder: Path, kind: str, image_size: int, patch_size: int, width: int, layers: int, encoder_image_size: int | None
) -> None:
    """A vision encoder and the image processor it ships with; the processor makes `image_size`-px squares."""
    common = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, patch_size=patch_size)
    square = {"height": image_size, "width": image_size}
    if kind == "siglip":
        config = SiglipVisionConfig(intermediate_size=2 * width, image_size=encoder_image_size or image_size, **common)
        model, processor = SiglipVisionModel(config), image_processor_class("Siglip")(size=square)
    elif kind == "clip":
        config = CLIPVisionConfig(intermediate_size=2 * width, image_size=encoder_image_size or image_size, **common)
        processor = image_processor_class("CLIP")(size={"shortest_edge": image_size}, crop_size=square)
        model = CLIPVisionModel(config)
    elif kind in ("dinov2", "dinov2-registers"):
        # The real folders declare 518 px and crop 224 (after resizing the shortest edge to 256).
        size = dict(image_size=encoder_image_size or 2 * image_size, mlp_ratio=2, **common)
        if kind == "dinov2":
            model = Dinov2Model(Dinov2Config(**size))
        else:
            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **size))
        processor = image_processor_class("Bit")(
            size={"shortest_edge": image_size * 8 // 7},
            crop_size=square,
            do_center_crop=True,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            resample=3,  # bicubic
        )
    else:
        raise ValueError(f"vision must be one of {VISION_KINDS}, got {kind!r}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


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
    vision: str = "siglip",
    text: str = "tiny",
    encoder_image_size: int | None = None,
) -> tuple[Path, Path]:
    """Write `folder/vision` and `folder/text`; returns both paths.

    `image_size` is the side of what the image processor makes; `encoder_image_size` is the encoder config's
    `image_size` (default: the same, but twice it for DINOv2, whose real folders declare 518 px and crop 224).
    `vision` and `text` choose the kinds of backbone (see the module docstring).

    `init_std` is far above transformers' 0.02 so that random weights give peaked, input-dependent predictions:
    with near-uniform logits, greedy decoding repeats one token and comparisons between code paths prove little.
    """
    if text not in TEXT_KINDS:
        raise ValueError(f"text must be one of {TEXT_KINDS}, got {text!r}")
    folder = Path(folder)
    transformers.set_seed(seed)
    vision_dir, text_dir = folder / "vision", folder / "text"
    write_vision_encoder(
        vision_dir, vision, image_size, patch_size, vision_width, vision_layers or layers, encoder_image_size
    )

    text_kwargs = dict(
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    if text == "tiny":
        tokenizer = train_tokenizer(corpus)
        tokenizer.save_pretrained(text_dir)
    else:
        (write_qwen_tokenizer if text == "qwen2.5" else write_smollm2_tokenizer)(text_dir, corpus)
        tokenizer = transformers.AutoTokenizer.from_pretrained(text_dir)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if text == "smollm2":
        config = LlamaConfig(vocab_size=len(tokenizer), rope_theta=100_000.0, bos_token_id=1, **ids, **text_kwargs)
        LlamaForCausalLM(config).save_pretrained(text_dir)
    else:
        # Qwen2.5's embeddings have rows past its last token (151936 for 151665 tokens): round up the same way.
        rows = len(tokenizer) if text == "tiny" else -(-len(tokenizer) // 64) * 64
        config = Qwen2Config(vocab_size=rows, rope_theta=1_000_000.0, **ids, **text_kwargs)
        Qwen2ForCausalLM(config).save_pretrained(text_dir)
    return vision_dir, text_dir
