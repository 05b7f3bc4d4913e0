"""Offline training and evaluation data: rendered shape scenes and an easy-VQA adapter.

The demo and the tests must run without the Hub, so this module builds small stand-ins in the real schemas:

* caption data in the LLaVA-ReCap / LLaVA-NeXT row schema (``id``, ``image``, ``conversations``), in a dense
  "recap" style (one detailed template, like LLaVA-ReCap) or a varied "human" style (like COCO captions);
* a COCO/Karpathy-like caption evaluation set with several mixed-style references per image (for CIDEr);
* easy-VQA (a PyPI package shipping 64×64 shape images) in the PathVQA schema (``image``, ``question``,
  ``answer``) and as LLaVA conversations for instruction tuning.

Images are always stored as embedded PNG bytes, so ``to_parquet`` / :func:`write_parquet` files are self-contained.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from .prompts import VQA_INSTRUCTION, vqa_prompt

CaptionStyle = Literal["recap", "human"]

# Shape colours are far apart in RGB and all contrast with every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (130, 40, 170),
    "orange": (245, 120, 0),
    "black": (20, 20, 20),
    "pink": (245, 110, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (205, 205, 205),
    "cream": (245, 235, 205),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
TEXTURES: dict[str, str] = {"plain": "plain", "speckled": "lightly speckled", "striped": "faintly striped"}

# Canonical (recap) position phrases for the cells of a 3×3 grid, indexed (row, column).
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}  # fmt: skip

# Human-style synonyms; every key maps back to one canonical word, so captions stay checkable.
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "dot", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
    "purple": ("purple", "violet"), "orange": ("orange",), "black": ("black",), "pink": ("pink",),
    "white": ("white",), "light grey": ("grey", "gray", "light grey", "light gray"),
    "cream": ("cream", "beige", "off-white"),
}  # fmt: skip

CAPTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "recap": (
        "Describe this image in detail.",
        "Give a detailed description of the picture.",
        "What is in this image? Describe every object and where it is.",
    ),
    "human": (
        "Write a short caption for this image.",
        "Describe the image briefly.",
        "Provide a one-sentence caption for the picture.",
    ),
}

CONVERSATION = List({"from": Value("string"), "value": Value("string")})
CONVERSATION_FEATURES = Features({"id": Value("string"), "image": Image(), "conversations": CONVERSATION})
EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})

_NUMBERS = ("no", "one", "two", "three")
_SUPERSAMPLE = 4  # draw at 4× and downsample: anti-aliased edges at 64 px


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cell: tuple[int, int]  # (row, column) in the 3×3 grid
    scale: float = 0.8  # shape diameter as a fraction of the cell size
    offset: tuple[float, float] = (0.0, 0.0)  # (dx, dy) jitter of the centre, in cell units

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row, then column)
    background: str = "white"
    texture: str = "plain"
    texture_seed: int = 0


# --------------------------------------------------------------------------- scenes and rendering


def sample_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """1–`max_objects` shapes with distinct colours in distinct grid cells; shape kinds may repeat."""
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(sorted(POSITIONS), n))
    colours = rng.sample(sorted(COLOURS), n)
    objects = tuple(
        SceneObject(
            shape=rng.choice(SHAPES),
            colour=colour,
            cell=cell,
            scale=rng.uniform(0.65, 0.85),
            offset=(rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08)),
        )
        for cell, colour in zip(cells, colours, strict=True)
    )
    return Scene(objects, rng.choice(sorted(BACKGROUNDS)), rng.choice(sorted(TEXTURES)), rng.randrange(2**31))


def make_scene(seed: int, index: int, split: str = "train") -> Scene:
    """The `index`-th scene of a seeded stream; `split` namespaces the stream so eval scenes differ from train."""
    return sample_scene(random.Random(f"valign-scene:{split}:{seed}:{index}"))


def object_centre(obj: SceneObject, image_size: int) -> tuple[float, float]:
    """Centre (x, y) of an object in pixel coordinates of an `image_size` image."""
    cell = image_size / 3
    row, col = obj.cell
    return (col + 0.5 + obj.offset[0]) * cell, (row + 0.5 + obj.offset[1]) * cell


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(radii: Sequence[float], start: float = -90.0) -> list[tuple[float, float]]:
        step = 360.0 / len(radii)
        angles = [math.radians(start + i * step) for i in range(len(radii))]
        return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in zip(radii, angles, strict=True)]

    if shape == "square":
        return ring([r * 1.15] * 4, start=-135.0)  # corners farther out: similar area to a circle
    if shape == "triangle":
        return ring([r] * 3)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        return ring([r, 0.45 * r] * 5)
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int = 64) -> PILImage.Image:
    """Render a scene as an RGB image (a pure function of the scene: same scene, same pixels)."""
    big = image_size * _SUPERSAMPLE
    bg = BACKGROUNDS[scene.background]
    img = PILImage.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    shade = tuple(max(0, c - 22) for c in bg)  # texture stays light so shapes dominate
    if scene.texture == "speckled":
        rng = random.Random(scene.texture_seed)
        for _ in range(image_size * 2):
            x, y = rng.uniform(0, big), rng.uniform(0, big)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=shade)
    elif scene.texture == "striped":
        period = max(8, big // 8)
        for k in range(-big, big, period):
            draw.line((k, 0, k + big, big), fill=shade, width=max(1, period // 4))
    for obj in scene.objects:
        cx, cy = (c * _SUPERSAMPLE for c in object_centre(obj, image_size))
        r = obj.scale * big / 6  # half of scale × cell size
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[obj.colour])
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=COLOURS[obj.colour])
    return img.resize((image_size, image_size), PILImage.Resampling.BOX)  # area average: no ringing halo


# --------------------------------------------------------------------------- captions


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def recap_caption(scene: Scene) -> str:
    """Dense caption from one fixed template: every object's colour, shape and position, plus the background."""
    objects = _join([f"{_article(o.colour)} {o.colour} {o.shape} {o.position}" for o in scene.objects])
    return f"{objects[0].upper()}{objects[1:]}, on a {TEXTURES[scene.texture]} {scene.background} background."


def _human_position(cell: tuple[int, int], rng: random.Random) -> str:
    row, col = cell
    if cell == (1, 1):
        return rng.choice(("in the middle", "in the center", "in the centre"))
    horizontal = {0: "left", 1: "", 2: "right"}[col]
    if not horizontal:
        edge = "top" if row == 0 else "bottom"
        return rng.choice((f"at the {edge}", f"near the {edge}", f"along the {edge}"))
    vertical = rng.choice({0: ("top", "upper"), 1: ("",), 2: ("bottom", "lower")}[row])
    if not vertical:
        return rng.choice((f"on the {horizontal}", f"on the {horizontal} side", f"to the {horizontal}"))
    return rng.choice((f"in the {vertical} {horizontal}", f"in the {vertical} {horizontal} corner"))


def human_caption(scene: Scene, rng: random.Random) -> str:
    """A short, varied caption: one of several templates, with synonyms, often leaving details out."""
    objs = list(scene.objects)
    rng.shuffle(objs)  # people do not list objects in reading order

    def noun(o: SceneObject, where: bool = False) -> str:
        colour, shape = rng.choice(COLOUR_SYNONYMS[o.colour]), rng.choice(SHAPE_SYNONYMS[o.shape])
        return f"{_article(colour)} {colour} {shape}" + (f" {_human_position(o.cell, rng)}" if where else "")

    bg = rng.choice(COLOUR_SYNONYMS[scene.background])
    n = len(objs)
    templates = [
        lambda: _join([noun(o) for o in objs]),
        lambda: f"{_join([noun(o) for o in objs])} on a {bg} background",
        lambda: f"{noun(objs[0], where=True)}",
        lambda: f"there is {_join([noun(o, where=True) for o in objs])}",
        lambda: f"{_article(bg)} {bg} picture with {_join([noun(o) for o in objs])}",
        lambda: f"simple drawing of {_join([noun(o) for o in objs])}",
        lambda: f"{_NUMBERS[n]} shape{'s' * (n > 1)} on a {bg} background",
        lambda: f"{_join([noun(o, where=True) for o in objs])}",
    ]
    text = rng.choice(templates)()
    text = text[0].upper() + text[1:] if rng.random() < 0.7 else text  # casual casing and punctuation
    return text + "." if rng.random() < 0.8 else text


def scene_caption(scene: Scene, style: CaptionStyle, rng: random.Random) -> str:
    if style == "recap":
        return recap_caption(scene)
    if style == "human":
        return human_caption(scene, rng)
    raise ValueError(f"style must be 'recap' or 'human', got {style!r}")


# --------------------------------------------------------------------------- datasets


def make_caption_dataset(n: int, style: CaptionStyle = "recap", seed: int = 0, image_size: int = 64) -> Dataset:
    """`n` rendered scenes as LLaVA-ReCap rows: ``id``, ``image`` (embedded PNG), ``conversations``.

    Scenes depend only on (`seed`, index), so both styles caption the very same images for a given seed.
    """
    rows: dict[str, list] = {"id": [], "image": [], "conversations": []}
    for i in range(n):
        scene = make_scene(seed, i)
        rng = random.Random(f"valign-caption:{style}:{seed}:{i}")
        prompt = rng.choice(CAPTION_PROMPTS[style])
        rows["id"].append(f"shapes-{seed}-{i:06d}")
        rows["image"].append(render_scene(scene, image_size))
        turns = [("human", f"<image>\n{prompt}"), ("gpt", scene_caption(scene, style, rng))]
        rows["conversations"].append([{"from": who, "value": text} for who, text in turns])
    return Dataset.from_dict(rows, features=CONVERSATION_FEATURES)


def make_caption_eval_set(n: int, seed: int = 0, image_size: int = 64, num_references: int = 5) -> Dataset:
    """COCO/Karpathy-like eval set: ``image``, ``image_id``, ``captions`` (1 recap + distinct human references).

    Scenes come from a separate "eval" stream, so they never repeat the training images of any seed.
    """
    rows: dict[str, list] = {"image": [], "image_id": [], "captions": []}
    for i in range(n):
        scene = make_scene(seed, i, split="eval")
        rng = random.Random(f"valign-eval-caption:{seed}:{i}")
        refs = [recap_caption(scene)]
        for _ in range(50 * num_references):  # distinct references; tiny scenes may have fewer phrasings
            if len(refs) == num_references:
                break
            if (cap := human_caption(scene, rng)) not in refs:
                refs.append(cap)
        rows["image"].append(render_scene(scene, image_size))
        rows["image_id"].append(i)
        rows["captions"].append(refs)
    features = Features({"image": Image(), "image_id": Value("int64"), "captions": List(Value("string"))})
    return Dataset.from_dict(rows, features=features)


def _question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "colour"


def load_easy_vqa(split: Literal["train", "test"] = "train", limit: int | None = None) -> Dataset:
    """easy-VQA in the PathVQA schema (``image``, ``question``, ``answer``) plus ``question_type`` and ``image_id``.

    Rows keep the package's order (questions grouped by image); `limit` keeps the first `limit` questions.
    Full sizes: train 38,575 questions on 4,000 images, test 9,673 on 1,000.
    """
    import easy_vqa  # optional dependency, only needed here

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    if limit is not None:
        questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    png: dict[int, bytes] = {i: Path(paths[i]).read_bytes() for i in sorted(set(image_ids))}  # embed, not paths
    rows = {
        "image": [{"bytes": png[i], "path": None} for i in image_ids],
        "question": questions,
        "answer": answers,
        "question_type": [_question_type(a) for a in answers],
        "image_id": image_ids,
    }
    features = Features(
        {
            "image": Image(),
            "question": Value("string"),
            "answer": Value("string"),
            "question_type": Value("string"),
            "image_id": Value("int64"),
        }
    )
    return Dataset.from_dict(rows, features=features)


def vqa_as_conversations(ds: Dataset, instruction: str = VQA_INSTRUCTION, id_prefix: str = "vqa-") -> Dataset:
    """PathVQA-schema rows → LLaVA conversation rows (``id``, ``image``, ``conversations``), one turn per question."""

    def convert(question: str, answer: str, idx: int) -> dict:
        human = f"<image>\n{vqa_prompt(question, instruction)}"
        return {
            "id": f"{id_prefix}{idx}",
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
        }

    # input_columns keeps the image column out of the function, so its bytes are never decoded or re-encoded.
    out = ds.map(
        convert,
        input_columns=["question", "answer"],
        with_indices=True,
        remove_columns=[c for c in ds.column_names if c != "image"],
    )
    return out.select_columns(list(CONVERSATION_FEATURES)).cast(CONVERSATION_FEATURES)


def easy_vqa_as_conversations(
    split: Literal["train", "test"] = "train", limit: int | None = None, instruction: str = VQA_INSTRUCTION
) -> Dataset:
    """easy-VQA as LLaVA instruction-tuning conversations: human ``<image>\\n{question} {instruction}``, gpt answer."""
    return vqa_as_conversations(load_easy_vqa(split, limit), instruction, id_prefix=f"easy-vqa-{split}-")


def write_parquet(dataset: Dataset, path: str | Path) -> Path:
    """Write `dataset` to one parquet file with image bytes embedded (plain ``to_parquet`` keeps bare file paths).

    ``datasets.load_dataset("parquet", data_files=path)`` then decodes the images as PIL images again.
    """
    from datasets.table import embed_table_storage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = dataset.format
    embedded = dataset.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
    embedded.with_format(**fmt).to_parquet(str(path))
    return path
