"""Model cards: the README.md every checkpoint valign saves or pushes carries.

One generator, `model_card`, serves every kind of checkpoint: a training stage (`stage_model_card`, used by
`run_recipe`), any saved folder (`write_model_card`, which reads the stage record `stage_config.json` when there is
one), the demo's last stage with its evaluation results, and merged LoRA checkpoints (`merged_model_card`). A card
holds:

- Hub metadata: `pipeline_tag: image-text-to-text`, `library_name: transformers`, `base_model`, `datasets`,
  `license`, `tags`, `widget` examples and, when evaluation results exist, `model-index`;
- usage with `AutoModelForImageTextToText` (transformers 4.57 and 5.x; `AutoModelForVision2Seq` is 4.x's older
  spelling) and the pipeline;
- where the widget's examples run: a Space with valign's app (named in `spaces:` when one is given) and a dedicated
  Inference Endpoint serving the checkpoint's `handler.py`;
- the training stage and configuration the checkpoint came from, evaluation, limitations and the citation.

The usage snippets are tested: tests/test_card.py runs them against a saved checkpoint in fresh processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..data.prompts import CAPTION_PROMPT

PAPER_URL = "https://arxiv.org/abs/2503.19508"
PAPER_TITLE = "Improved Alignment of Modalities in Large Vision Language Models"
CITATION = """@misc{improvedalignment2025,
  title         = {Improved Alignment of Modalities in Large Vision Language Models},
  year          = {2025},
  eprint        = {2503.19508},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV},
  url           = {https://arxiv.org/abs/2503.19508}
}"""
DEFAULT_REPO_ID = "your-username/valign"  # placeholder in the usage snippets when the caller names no repo
# A public image the Hub's documentation uses for image-text-to-text; the widget and the snippets load it.
EXAMPLE_IMAGE_URL = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/bee.jpg"
EXAMPLE_QUESTION = "What is in the picture?"
STAGE_RECORD = "stage_config.json"  # the stage record `run_stage` writes next to the weights
# pycocoevalcap's score names -> (model-index metric type, display name).
CAPTION_METRICS = {
    "CIDEr": ("cider", "CIDEr"),
    "Bleu_4": ("bleu", "BLEU-4"),
    "METEOR": ("meteor", "METEOR"),
    "ROUGE_L": ("rouge", "ROUGE-L"),
    "SPICE": ("spice", "SPICE"),
}
LIMITATIONS = """\
- One image per turn, resized to the vision encoder's resolution (224 px and 256 image tokens with the paper's
  SigLIP so400m-patch14-224): small text and fine detail are lost. English only, as its training data.
- Like other vision-language models it can describe objects, attributes or text that are not in the image. Do not
  use it where such errors cause harm (medical, legal or safety decisions, identifying people).
- The attention policy lives in `config.attn_mode`. The hybrid mask needs the `sdpa` or `eager` attention kernel
  (FlashAttention-2 and flex attention are refused outside causal mode); an alignment-stage (bidirectional)
  checkpoint is decoded with the hybrid mask, since bidirectional attention is not consistent with a KV cache.
- The model is remote code: `trust_remote_code=True` runs this repository's Python files. Pin a `revision` you
  have read.
"""


@dataclass(frozen=True)
class Benchmark:
    """Which data a results file's numbers were measured on (each model-index entry must name its data set)."""

    dataset_type: str  # a Hub data set id where there is one
    dataset_name: str
    split: str | None = None


def model_card(
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    title: str | None = None,
    summary: str | None = None,
    stage: str | None = None,
    config: Mapping[str, Any] | None = None,
    base_models: Sequence[str] = (),
    datasets: Sequence[str] = (),
    eval_results: Sequence[EvalResult] = (),
    metrics: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
    license: str = "apache-2.0",
    space: str | None = None,
) -> str:
    """The README.md text of a valign checkpoint.

    `repo_id` (a placeholder when None) and `revision` (e.g. the stage's branch) fill the usage snippets. `stage`
    and `config` record where the checkpoint came from; `metrics` are plain numbers for the card's text (e.g. the
    final loss), `eval_results` also become the `model-index` metadata. Local paths among `base_models` and
    `datasets` are named in the text only: the Hub's metadata takes Hub ids. `space` is the id of a Space serving
    valign's app with this model (`spaces:` metadata and the serving section).
    """
    repo_id = repo_id or DEFAULT_REPO_ID
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=hub_ids(base_models) or None,  # None: omitted rather than an empty list
        datasets=hub_ids(datasets) or None,
        license=license,
        # "conversational" makes the Hub show its chat widget for image-text-to-text models.
        tags=["valign", "vision-language", "conversational", *([stage] if stage else []), *tags],
        eval_results=list(eval_results) or None,
        widget=widget_examples(),
        spaces=[space] if space else None,
    )
    sections = [
        _intro(title, summary, stage, base_models),
        _usage_section(repo_id, revision, (config or {}).get("attn_mode")),
        _serving_section(repo_id, revision, space),
        _training_section(stage, config, datasets),
        _evaluation_section(eval_results, metrics),
        f"## Limitations\n\n{LIMITATIONS}",
        f"## Citation\n\n```bibtex\n{CITATION}\n```\n",
    ]
    body = "\n".join(section for section in sections if section)
    # Parsing the assembled text through ModelCard checks the metadata block (YAML, model-index) once more.
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def stage_model_card(
    stage: str,
    config: Mapping[str, Any],
    datasets: list[str],
    base_models: list[str],
    metrics: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    eval_results: Sequence[EvalResult] = (),
    space: str | None = None,
) -> str:
    """README.md for one stage's checkpoint (see `model_card`); its usage pins the stage's branch.

    `repo_id` only fills the usage snippets (a placeholder when None).
    """
    return model_card(
        repo_id=repo_id,
        revision=stage,
        stage=stage,
        config=config,
        base_models=base_models,
        datasets=datasets,
        metrics=metrics,
        eval_results=eval_results,
        space=space,
    )


def merged_model_card(
    base_model: str,
    dataset: str,
    settings: Mapping[str, Any],
    eval_results: Sequence[EvalResult] = (),
    repo_id: str | None = None,
    space: str | None = None,
) -> str:
    """README.md for a LoRA fine-tune merged into its base's weights."""
    return model_card(
        repo_id=repo_id,
        title=f"valign + LoRA on {dataset} (merged)",
        summary=(
            f"`{base_model}` fine-tuned with LoRA on the language model's projections and a fully trained projector "
            "(`python -m valign.train.peft_vqa`), then merged into the weights."
        ),
        stage="lora-vqa",
        config=settings,
        base_models=[base_model],
        datasets=[dataset],
        eval_results=eval_results,
        tags=["lora", "vqa"],
        space=space,
    )


def write_model_card(
    folder: str | Path,
    *,
    eval_results: Sequence[EvalResult] = (),
    base_models: Sequence[str] = (),
    repo_id: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write `folder/README.md`; a training stage's name, configuration and data come from its stage record."""
    folder = Path(folder)
    record = folder / STAGE_RECORD
    if record.is_file():
        config = json.loads(record.read_text(encoding="utf-8"))
        kwargs = {
            "stage": config["name"],
            "revision": config["name"],  # run_recipe pushes each stage to a branch of that name
            "config": config,
            "datasets": [source["source"] for source in config.get("data", [])],
            **kwargs,
        }
    text = model_card(repo_id=repo_id, base_models=base_models, eval_results=eval_results, **kwargs)
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def hub_ids(names: Sequence[str]) -> list[str]:
    """The names that can be Hub repo ids ("owner/name", not an existing local path)."""

    def is_hub_id(name: str) -> bool:
        if "/" not in name or os.path.exists(name):
            return False
        try:
            validate_repo_id(name)
        except HFValidationError:
            return False
        return True

    return [name for name in names if is_hub_id(name)]


def widget_examples(image_url: str = EXAMPLE_IMAGE_URL) -> list[dict[str, Any]]:
    """Examples for the Hub's image-text-to-text widget, the chat widget: each example is a list of chat messages
    whose content chunks are `{"type": "text"}` and `{"type": "image_url", "image_url": {"url": ...}}`, as in the
    chat-completion API (huggingface.js `WidgetExampleChatInput`)."""
    return [
        {
            "example_title": title,
            "messages": [
                {
                    "role": "user",
                    # A fresh dict per example: a shared one would be written as a YAML anchor and alias.
                    "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}],
                }
            ],
        }
        for title, text in (("Caption", CAPTION_PROMPT), ("Question", EXAMPLE_QUESTION))
    ]


def eval_results_from_json(
    results: Mapping[str, Any] | str | Path,
    captions: Benchmark | None = None,
    vqa: Benchmark | None = None,
) -> list[EvalResult]:
    """model-index entries from a results file as `run_demo` writes it (or its parsed dict): caption scores under
    `captions.scores` (pycocoevalcap's names, 0–1) and VQA accuracy under `vqa.model.accuracy` (0–1). Values are
    reported ×100, as papers quote them. A part is read only when its `Benchmark` is given."""
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    entries = []
    scores = results.get("captions", {}).get("scores", {}) if captions else {}
    for key, (metric_type, metric_name) in CAPTION_METRICS.items():
        if scores.get(key) is not None:
            entries.append(
                _eval_result("image-to-text", "Image captioning", captions, metric_type, metric_name, scores[key])
            )
    accuracy = results.get("vqa", {}).get("model", {}).get("accuracy") if vqa else None
    if accuracy is not None:
        entries.append(_eval_result("visual-question-answering", "VQA", vqa, "accuracy", "VQA accuracy", accuracy))
    return entries


def _eval_result(task: str, task_name: str, benchmark: Benchmark, metric: str, name: str, value: float) -> EvalResult:
    return EvalResult(
        task_type=task,
        task_name=task_name,
        dataset_type=benchmark.dataset_type,
        dataset_name=benchmark.dataset_name,
        dataset_split=benchmark.split,
        metric_type=metric,
        metric_name=name,
        metric_value=round(100 * float(value), 2),
    )


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def _intro(title: str | None, summary: str | None, stage: str | None, base_models: Sequence[str]) -> str:
    heading = title or (f"valign — {stage}" if stage else "valign")
    origin = f"Checkpoint at the end of training stage **{stage}** of valign" if stage else "A checkpoint of valign"
    bases = ", ".join(f"`{name}`" for name in base_models) or "none recorded"
    text = (
        f"{origin}, an implementation of [{PAPER_TITLE}]({PAPER_URL}): a vision encoder (the paper's is SigLIP), "
        "a 2-layer MLP projector and a decoder-only language model whose image tokens attend to each other both "
        f"ways (the hybrid attention mask). Base models: {bases}."
    )
    return "\n\n".join([f"# {heading}", *([summary] if summary else []), text]) + "\n"


# The range valign's CI tests (README, "Supported versions"): the locked releases, 5.23 and the newest 5.x.
SUPPORTED_TRANSFORMERS = (
    "Supported transformers releases: 4.57 and 5.23 up to the newest 5.x (CI tests 4.57.6, 5.23.0, 5.24.0 and the "
    "newest release)."
)


def _usage_section(repo_id: str, revision: str | None, attn_mode: str | None = None) -> str:
    pin = f'revision="{revision}", ' if revision else ""
    pin_note = f' This card pins the revision `"{revision}"` (its branch); drop it for `main`.' if revision else ""
    # generate() refuses bidirectional attention (not consistent with a KV cache): such a checkpoint is decoded
    # with the hybrid mask, so its snippets ask for it.
    hybrid = attn_mode == "bidirectional"
    mode_note = (
        "\n\nThis checkpoint was trained with bidirectional attention (`config.attn_mode`), which `generate` "
        'refuses: the snippets decode it with the hybrid mask (`attn_mode="hybrid"`).'
        if hybrid
        else ""
    )
    mode = 'attn_mode="hybrid", ' if hybrid else ""
    pipe_mode = ', generate_kwargs={"attn_mode": "hybrid"}' if hybrid else ""
    return f"""## Usage

The model is remote code: load it with `trust_remote_code=True`.{pin_note} {SUPPORTED_TRANSFORMERS}{mode_note}

```python
import transformers
from transformers.image_utils import load_image

repo_id = "{repo_id}"
image = load_image("{EXAMPLE_IMAGE_URL}")

# AutoModelForImageTextToText works on transformers 4.57 and 5.x. On 4.x, AutoModelForVision2Seq (its older
# spelling, removed in 5.0) keeps working too but prints a FutureWarning.
model = transformers.AutoModelForImageTextToText.from_pretrained(repo_id, {pin}trust_remote_code=True)
processor = transformers.AutoProcessor.from_pretrained(repo_id, {pin}trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{CAPTION_PROMPT}"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt])
tokens = model.generate(**inputs, {mode}max_new_tokens=40, do_sample=False)
print(processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0])
```

With the pipeline:

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo_id}", {pin}trust_remote_code=True)
image = {{"type": "image", "url": "{EXAMPLE_IMAGE_URL}"}}
messages = [{{"role": "user", "content": [image, {{"type": "text", "text": "{EXAMPLE_QUESTION}"}}]}}]
print(pipe(text=messages, max_new_tokens=40, return_full_text=False{pipe_mode})[0]["generated_text"])
```

From the command line, with the valign package installed: `valign caption photo.jpg --model {repo_id}` or
`valign ask photo.jpg "{EXAMPLE_QUESTION}" --model {repo_id}`.
"""


def _serving_section(repo_id: str, revision: str | None, space: str | None) -> str:
    pin = f" (branch `{revision}`)" if revision else ""
    space_line = (
        f"[{space}](https://huggingface.co/spaces/{space}) runs valign's app (`app.py`) with this model."
        if space
        else "a Space can run valign's app (`app.py` of the valign package, with the Space variable `VALIGN_MODEL` "
        f"set to `{repo_id}`)."
    )
    question = widget_examples()[-1]["messages"]  # the request body of the widget's question example
    request = json.dumps({"inputs": question, "parameters": {"max_new_tokens": 40}})
    return f"""## Serving: where the widget's examples run

The Hub's serverless inference (Inference Providers) does not run models with custom code, so the widget on this
page answers only where a deployment of this repository serves it:

- **Space**: {space_line}
- **Dedicated Inference Endpoint**: `handler.py`{pin} is the custom handler that Inference Endpoints load
  (`EndpointHandler`): create an endpoint from this repository and it is picked up (on a GPU it runs in bf16).
  It takes the widget's chat messages as `inputs`, images as URLs (fetched with a timeout and a size limit), data
  URIs or base64, and answers as `pipeline("image-text-to-text")` does; a bad request gets HTTP 400 with
  `{{"error": ...}}`:

```bash
curl "$ENDPOINT_URL" -H "Authorization: Bearer $HF_TOKEN" -H "Content-Type: application/json" \\
  -d '{request}'
```
"""


def _training_section(stage: str | None, config: Mapping[str, Any] | None, datasets: Sequence[str]) -> str:
    if stage is None and config is None and not datasets:
        return "## Training\n\nNo training record: this folder was saved without a training stage.\n"
    lines = ["## Training", ""]
    if stage:
        mode = f", attention mode `{config['attn_mode']}`" if config and "attn_mode" in config else ""
        lines += [f"Training stage: **{stage}**{mode}.", ""]
    items = "\n".join(f"- `{name}`" for name in datasets) or "- none recorded"
    lines += ["Data:", "", items, ""]
    if config:
        # The JSON round trip turns paths, tuples and other non-YAML types into plain values first.
        plain = json.loads(json.dumps(dict(config), default=str))
        lines += ["Configuration:", "", "```yaml", yaml.safe_dump(plain, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _evaluation_section(eval_results: Sequence[EvalResult], metrics: Mapping[str, Any] | None) -> str:
    if not eval_results and not metrics:
        return ""
    lines = ["## Evaluation", ""]
    if eval_results:
        lines += ["| task | data set | split | metric | value |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.task_name or r.task_type} | {r.dataset_name} | {r.dataset_split or ''} | "
            f"{r.metric_name or r.metric_type} | {r.metric_value} |"
            for r in eval_results
        ]
        lines += ["", "Scores ×100 (pycocoevalcap for captions, exact match for VQA), greedy decoding.", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in metrics.items()), ""]
    return "\n".join(lines)
