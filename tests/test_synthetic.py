"""Offline data: rendered shape scenes, their captions, the easy-VQA adapter and the parquet round trip."""

from __future__ import annotations

import random
import re

import easy_vqa
import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset, Image, load_dataset

from valign.data.synthetic import (
    COLOUR_SYNONYMS,
    COLOURS,
    SHAPE_SYNONYMS,
    Scene,
    SceneObject,
    easy_vqa_as_conversations,
    human_caption,
    load_easy_vqa,
    make_caption_dataset,
    make_caption_eval_set,
    make_scene,
    object_centre,
    recap_caption,
    write_parquet,
)


def _pixels(ds: Dataset) -> list[np.ndarray]:
    return [np.asarray(img) for img in ds["image"]]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z-]+", text.lower())


def _caption(row: dict) -> str:
    return row["conversations"][1]["value"]


def test_schema_and_prompt() -> None:
    ds = make_caption_dataset(4, "recap", seed=0, image_size=48)
    assert ds.column_names == ["id", "image", "conversations"]
    row = ds[0]
    assert row["image"].size == (48, 48) and row["image"].mode == "RGB"
    human, gpt = row["conversations"]
    assert human["from"] == "human" and "<image>" in human["value"] and gpt["from"] == "gpt"
    assert len(set(ds["id"])) == 4


def test_seed_determinism() -> None:
    a, b = make_caption_dataset(6, "human", seed=3), make_caption_dataset(6, "human", seed=3)
    c = make_caption_dataset(6, "human", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b), strict=True))
    assert a["conversations"] == b["conversations"]
    assert not all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(c), strict=True))
    assert a["conversations"] != c["conversations"]
    # Both styles caption the very same images for one seed.
    recap = make_caption_dataset(6, "recap", seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(recap), strict=True))


def test_images_show_the_described_scene() -> None:
    size = 64
    ds = make_caption_dataset(20, "recap", seed=1, image_size=size)
    for i, img in enumerate(ds["image"]):
        pixels = np.asarray(img).astype(int)
        for obj in make_scene(1, i).objects:
            x, y = object_centre(obj, size)
            assert np.abs(pixels[int(y), int(x)] - COLOURS[obj.colour]).max() <= 2, (i, obj)


# Captions written out: a change to the scene sampler or the template shows here.
TRAIN_SEED_2_FIRST = (
    "A blue star at the top, a purple triangle in the bottom left and a pink square at the bottom, on a lightly "
    "speckled light grey background."
)
EVAL_SEED_0_FIRST = (
    "A purple circle in the top right and a black triangle on the left, on a faintly striped cream background."
)


def test_recap_caption_of_a_hand_made_scene() -> None:
    scene = Scene((SceneObject("circle", "orange", (0, 0)), SceneObject("star", "green", (1, 1))), "cream", "speckled")
    expected = (
        "An orange circle in the top left and a green star in the centre, on a lightly speckled cream background."
    )
    assert recap_caption(scene) == expected


def test_recap_mentions_every_object() -> None:
    ds = make_caption_dataset(30, "recap", seed=2)
    assert _caption(ds[0]) == TRAIN_SEED_2_FIRST
    for i, row in enumerate(ds):
        scene = make_scene(2, i)
        caption = _caption(row)
        assert 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape} {obj.position}" in caption
        assert f"{scene.background} background" in caption


def test_human_captions_are_grounded_varied_and_shorter() -> None:
    colour_of = {w: c for c, words in COLOUR_SYNONYMS.items() for syn in words for w in _words(syn)}
    shape_of = {w: s for s, words in SHAPE_SYNONYMS.items() for w in words}
    content = set(colour_of) | set(shape_of)
    human_openings, recap_openings = set(), set()
    human_len, recap_len = [], []
    for i in range(50):
        scene = make_scene(5, i)
        human, recap = human_caption(scene, random.Random(i)), recap_caption(scene)
        words = _words(human)
        # No hallucinations: every colour / shape word names something in the scene.
        allowed_colours = {o.colour for o in scene.objects} | {scene.background}
        assert {colour_of[w] for w in words if w in colour_of} <= allowed_colours, human
        assert {shape_of[w] for w in words if w in shape_of} <= {o.shape for o in scene.objects}, human
        # Template opening: first words with articles merged and colour / shape words blanked out.
        human_openings.add(tuple("_" if w in content else {"an": "a"}.get(w, w) for w in words[:2]))
        recap_openings.add(tuple("_" if w in content else {"an": "a"}.get(w, w) for w in _words(recap)[:2]))
        assert recap.endswith(" background.")
        human_len.append(len(words))
        recap_len.append(len(_words(recap)))
    assert len(recap_openings) == 1 and len(human_openings) >= 5
    assert np.mean(human_len) < np.mean(recap_len)
    # One scene gets many phrasings in the human style, exactly one in the recap style.
    scene = make_scene(5, 0)
    assert len({human_caption(scene, random.Random(k)) for k in range(20)}) >= 5


def test_caption_eval_set() -> None:
    ev = make_caption_eval_set(5, seed=0, num_references=5)
    assert ev.column_names == ["image", "image_id", "captions"]
    assert ev["image_id"] == list(range(5))
    assert ev["captions"][0][0] == EVAL_SEED_0_FIRST
    for i, refs in enumerate(ev["captions"]):
        scene = make_scene(0, i, split="eval")
        assert all(f"{o.colour} {o.shape} {o.position}" in refs[0] for o in scene.objects)
        assert len(refs) >= 2 and len(set(refs)) == len(refs)
    # Eval scenes are not the training scenes of the same seed.
    train = make_caption_dataset(5, "recap", seed=0)
    assert not any(np.array_equal(x, y) for x, y in zip(_pixels(ev), _pixels(train), strict=True))


def test_parquet_round_trip(tmp_path) -> None:
    ds = make_caption_dataset(5, "human", seed=7)
    path = write_parquet(ds, tmp_path / "caps.parquet")
    images = pq.read_table(path).column("image").to_pylist()
    assert all(img["bytes"] for img in images)  # bytes embedded, not paths
    back = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert back.features == ds.features
    assert back["conversations"] == ds["conversations"] and back["id"] == ds["id"]
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(back), _pixels(ds), strict=True))


def test_write_parquet_embeds_path_images(tmp_path) -> None:
    paths = easy_vqa.get_test_image_paths()
    ds = Dataset.from_dict({"image": [paths[0], paths[1]]}).cast_column("image", Image())
    path = write_parquet(ds, tmp_path / "paths.parquet")
    assert all(img["bytes"] for img in pq.read_table(path).column("image").to_pylist())
    back = Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(np.asarray(back[1]["image"]), np.asarray(ds[1]["image"]))


def test_easy_vqa_adapter() -> None:
    answers = set(easy_vqa.get_answers())
    assert len(answers) == 13
    ds = load_easy_vqa("train", limit=100)
    assert len(ds) == 100 and ds.column_names[:3] == ["image", "question", "answer"]
    assert ds[0]["image"].size == (64, 64)
    full = load_easy_vqa("test")
    assert len(full) == 9673 and full["question_type"].count("yes/no") == 7136  # easy-vqa's documented counts
    for q, a, t in zip(full["question"], full["answer"], full["question_type"], strict=True):
        assert a in answers
        expected = "yes/no" if a in ("yes", "no") else "shape" if a in ("circle", "rectangle", "triangle") else "colour"
        assert t == expected
        assert q.split()[0] in (("is", "does") if t == "yes/no" else ("what",))
    assert set(full["question_type"]) == {"shape", "colour", "yes/no"}


def test_easy_vqa_conversations() -> None:
    vqa = load_easy_vqa("test", limit=20)
    conv = easy_vqa_as_conversations("test", limit=20)
    assert conv.column_names == ["id", "image", "conversations"] and len(set(conv["id"])) == 20
    for v, c in zip(vqa, conv, strict=True):
        human, gpt = c["conversations"]
        assert human["value"].startswith("<image>\n") and v["question"].lower() in human["value"].lower()
        assert gpt == {"from": "gpt", "value": v["answer"]}
        assert np.array_equal(np.asarray(c["image"]), np.asarray(v["image"]))
