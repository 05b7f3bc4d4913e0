"""Fault injection, images: one decoder (`processing_valign.load_image`) for training, evaluation, the command line
and the app; transparency, EXIF orientation and wide pixel formats decoded right; decompression bombs, NaN / Inf
pixels and oversized uploads refused with a clear error, per file, while the other files still run."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from conftest import direct_answer, shape_image
from PIL import Image, ImageFile
from transformers.image_utils import load_image as transformers_load_image

from valign import app as app_module
from valign import cli
from valign.data.adapters import adapt
from valign.data.images import decode_image
from valign.data.skips import SkipRow
from valign.eval.generate import DecodingSettings
from valign.processing_valign import ImageError, load_image

WHITE, RED, GREEN = (255, 255, 255), (255, 0, 0), (0, 255, 0)
ORIENTATION = 0x0112  # the EXIF tag; 6 = "rotate 90° clockwise to view"
BOMB_SIDE = 12000  # 144 M pixels: over PIL's 89.5 M limit, under twice it (where PIL itself only warns)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def saved(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


# --------------------------------------------------------------------------- drawn test images
# Each returns the file and what load_image must make of it.


def rgba(tmp: Path) -> tuple[Path, np.ndarray]:
    """Left half opaque red; right half fully transparent over hidden black, one hidden green pixel."""
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 4, 4))
    image.putpixel((6, 1), (*GREEN, 0))
    expected = np.full((4, 8, 3), 255, np.uint8)
    expected[:, :4] = RED
    return saved(image, tmp / "rgba.png"), expected


def la(tmp: Path) -> tuple[Path, np.ndarray]:
    image = Image.new("LA", (8, 4), (0, 0))
    image.paste((100, 255), (0, 0, 4, 4))
    expected = np.full((4, 8, 3), 255, np.uint8)
    expected[:, :4] = 100
    return saved(image, tmp / "la.png"), expected


def palette_transparency(tmp: Path) -> tuple[Path, np.ndarray]:
    """A palette image whose entry 1 (black) is marked transparent (a PNG tRNS chunk)."""
    image = Image.new("P", (8, 4), 1)
    image.putpalette([*RED, 0, 0, 0])
    image.paste(0, (0, 0, 4, 4))
    expected = np.full((4, 8, 3), 255, np.uint8)
    expected[:, :4] = RED
    return saved(image, tmp / "palette.png", transparency=1), expected


def rgb_trns(tmp: Path) -> tuple[Path, np.ndarray]:
    """An RGB PNG whose tRNS chunk makes black transparent."""
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.paste(RED, (0, 0, 4, 4))
    expected = np.full((4, 8, 3), 255, np.uint8)
    expected[:, :4] = RED
    return saved(image, tmp / "trns.png", transparency=(0, 0, 0)), expected


def half_alpha(tmp: Path) -> tuple[Path, np.ndarray]:
    image = Image.new("RGBA", (4, 4), (*RED, 128))
    expected = np.full((4, 4, 3), (255, 127, 127), np.uint8)  # 128/255 red over 127/255 white
    return saved(image, tmp / "half.png"), expected


def exif_rotated(tmp: Path) -> tuple[Path, np.ndarray]:
    """Stored 6×4 with EXIF orientation 6: it is viewed (and must be read) 4×6, turned 90° clockwise."""
    stored = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return saved(stored, tmp / "rotated.png", exif=exif), np.rot90(np.asarray(stored), k=-1)


def sixteen_bit(tmp: Path) -> tuple[Path, np.ndarray]:
    """A 16-bit grey ramp over the full range (PIL's own conversion clips it to 0–255: almost all white)."""
    values = np.linspace(0, 65535, 32 * 16).astype(np.uint16).reshape(16, 32)
    path = saved(Image.fromarray(values), tmp / "sixteen.png")
    assert Image.open(path).mode in ("I;16", "I")
    return path, np.repeat(np.rint(values / 257).astype(np.uint8)[..., None], 3, axis=2)


def grayscale(tmp: Path) -> tuple[Path, np.ndarray]:
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    return saved(Image.fromarray(values), tmp / "grey.png"), np.repeat(values[..., None], 3, axis=2)


def cmyk(tmp: Path) -> tuple[Path, np.ndarray]:
    image = Image.new("CMYK", (4, 2), (255, 0, 0, 0))  # cyan
    image.paste((0, 0, 0, 255), (2, 0, 4, 2))  # black
    expected = np.zeros((2, 4, 3), np.uint8)
    expected[:, :2] = (0, 255, 255)
    return saved(image, tmp / "cmyk.tif"), expected


def one_bit(tmp: Path) -> tuple[Path, np.ndarray]:
    image = Image.new("1", (4, 2), 0)
    image.paste(1, (0, 0, 2, 2))
    expected = np.zeros((2, 4, 3), np.uint8)
    expected[:, :2] = 255
    return saved(image, tmp / "one-bit.png"), expected


Drawn = Callable[[Path], tuple[Path, np.ndarray]]
TRANSPARENT: list[Drawn] = [rgba, la, palette_transparency, rgb_trns, half_alpha]
DECODED: list[Drawn] = [*TRANSPARENT, exif_rotated, sixteen_bit, grayscale, cmyk, one_bit]


def name_of(drawn: Drawn) -> str:
    return drawn.__name__


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("drawn", DECODED, ids=name_of)
def test_each_kind_of_image_decodes_to_the_expected_rgb_pixels(tmp_path, drawn):
    path, expected = drawn(tmp_path)
    np.testing.assert_array_equal(pixels(load_image(path)), expected)


@pytest.mark.parametrize("drawn", TRANSPARENT, ids=name_of)
def test_transparency_is_white_in_training_and_inference(tmp_path, drawn, model_and_processor):
    path, expected = drawn(tmp_path)
    trained = decode_image({"bytes": path.read_bytes(), "path": None})
    np.testing.assert_array_equal(pixels(trained), expected)
    inferred = model_and_processor[1](images=[str(path)], text="<|image_pad|>")["pixel_values"]
    from_training = model_and_processor[1](images=[trained], text="<|image_pad|>")["pixel_values"]
    assert torch.equal(inferred, from_training)


def test_exif_orientation_is_applied_as_transformers_does(tmp_path):
    path, expected = exif_rotated(tmp_path)
    ours = pixels(load_image(path))
    assert ours.shape == (6, 4, 3)
    np.testing.assert_array_equal(ours, np.asarray(transformers_load_image(str(path))))
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 257, 32896, 65535]], np.int32), [0, 1, 128, 255]),  # mode "I": 16-bit full scale
        (np.array([[-3.0, 0.4, 127.6, 300.0]], np.float32), [0, 0, 128, 255]),  # mode "F": PIL's 0–255 scale
    ],
    ids=["I", "F"],
)
def test_wide_in_memory_images_are_scaled_to_8_bits(array, expected):
    image = Image.fromarray(array)
    assert image.mode in ("I", "F")
    np.testing.assert_array_equal(pixels(load_image(image))[0, :, 0], expected)


def test_a_16_bit_png_keeps_256_grey_levels(tmp_path):
    path, _ = sixteen_bit(tmp_path)
    assert len(np.unique(pixels(load_image(path)))) == 256


@pytest.mark.parametrize("drawn", [rgba, palette_transparency, exif_rotated, sixteen_bit, grayscale], ids=name_of)
def test_training_and_inference_read_bit_identical_pixels(tmp_path, drawn, model_and_processor):
    path, _ = drawn(tmp_path)
    inference = pixels(load_image(str(path)))
    as_datasets_decodes = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
    training = [
        decode_image({"bytes": path.read_bytes(), "path": None}),
        decode_image({"bytes": None, "path": path.name}, image_root=tmp_path),
        decode_image(str(path)),
        decode_image(as_datasets_decodes[0]["image"]),  # evaluation's rows, decoded by datasets first
        load_image(path.read_bytes()),
    ]
    for image in training:
        np.testing.assert_array_equal(pixels(image), inference)
    processor = model_and_processor[1]
    by_path = processor(images=[str(path)], text="<|image_pad|>")["pixel_values"]
    assert torch.equal(by_path, processor(images=[training[0]], text="<|image_pad|>")["pixel_values"])


# --------------------------------------------------------------------------- decompression bombs


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 12000² one-bit PNG: a few kilobytes on disk, 432 MB once decoded to RGB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(path)
    assert path.stat().st_size < 100_000
    return path


@pytest.fixture
def decoded_files(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image file decoded (ImageFile.load), to prove a refused image never was."""
    calls, load = [], ImageFile.ImageFile.load

    def recording(self):
        calls.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording)
    return calls


def test_a_decompression_bomb_is_refused_from_its_header_naming_it(bomb, decoded_files):
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's default is valign's limit
    with pytest.raises(ImageError, match=rf"image {bomb} is too large: 12000×12000 = 144,000,000 pixels"):
        load_image(bomb)
    with pytest.raises(ValueError, match=r"<bytes> is too large: .*144,000,000 pixels"):  # a ValueError, as cli catches
        load_image(bomb.read_bytes())
    assert decoded_files == []


def test_an_image_over_twice_the_limit_is_refused_naming_it(tmp_path, monkeypatch, decoded_files):
    path = saved(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL itself raises past 200
    with pytest.raises(ImageError, match=rf"image {path} is too large: .*\(400 pixels\)"):
        load_image(path)
    with pytest.raises(ImageError, match=r"<Image> is too large: 20×20 = 400 pixels"):  # already decoded in memory
        load_image(Image.new("RGB", (20, 20)))
    assert decoded_files == []


def test_a_decompression_bomb_in_training_data_is_a_counted_skip(bomb):
    rows = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(shape_image(c)), "path": None} for c in ("red", "blue")]
            + [{"bytes": bomb.read_bytes(), "path": None}],
            "caption": ["A red ellipse.", "A blue ellipse.", "Nothing."],
        }
    )
    dataset = adapt(rows)
    assert [sample["id"] for sample in dataset] == ["0", "1"]
    assert dataset.skips.counts == {"unreadable_image": 1} and dataset.skips.rows_read == 3
    assert "144,000,000 pixels" in dataset.skips.report()
    with pytest.raises(SkipRow, match="unreadable_image: image <bytes> is too large"):
        decode_image(bomb.read_bytes())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_caption_reports_the_bomb_and_answers_the_other_files(
    bomb, tmp_path, checkpoint, model_and_processor, capsys
) -> None:
    red, blue = (saved(shape_image(c), tmp_path / f"{c}.png") for c in ("red", "blue"))
    paths = [str(red), str(bomb), str(blue)]
    argv = ["caption", *paths, "--model", str(checkpoint), "--batch-size", "3", "--max-new-tokens", "6", "--json"]
    status = cli.main(argv)
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and [r["path"] for r in records] == paths
    for record, colour in ((records[0], "red"), (records[2], "blue")):
        expected = direct_answer(*model_and_processor, shape_image(colour), "Describe the image in detail.", 6)
        assert record == {"path": record["path"], "text": expected}
    assert set(records[1]) == {"path", "error"} and "144,000,000 pixels" in records[1]["error"]
    assert "1 of 3 images failed" in err


# --------------------------------------------------------------------------- the app


def test_the_app_shows_the_pixel_limit_as_an_error(bomb, model_and_processor):
    settings = DecodingSettings(max_new_tokens=2, batch_size=1)
    with pytest.raises(gr.Error, match=r"too large: 12000×12000 = 144,000,000 pixels"):
        app_module.answer(*model_and_processor, settings, str(bomb), "")


def test_the_app_refuses_uploads_over_its_size_limit(model_and_processor):
    assert app_module.MAX_FILE_SIZE == "20mb"
    blocks = app_module.build_app(*model_and_processor, DecodingSettings(max_new_tokens=2, batch_size=1))
    _, url, _ = app_module.launch(blocks, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    try:
        with httpx.Client(trust_env=False, timeout=60) as client:
            upload = f"{url.rstrip('/')}/gradio_api/upload"
            small = client.post(upload, files={"files": ("small.png", png_bytes(shape_image("red")), "image/png")})
            large = client.post(upload, files={"files": ("large.png", b"\0" * 21_000_000, "image/png")})
    finally:
        blocks.close()
    assert small.status_code == 200 and len(small.json()) == 1
    assert large.status_code == 413 and "maximum allowed size" in large.text


# --------------------------------------------------------------------------- NaN / Inf pixels


@pytest.mark.parametrize(
    "image",
    [
        np.full((32, 32, 3), np.nan, np.float32),
        torch.full((3, 32, 32), float("inf")),
        Image.fromarray(np.full((8, 8), np.nan, np.float32)),
    ],
    ids=["numpy-nan", "tensor-inf", "pil-float-nan"],
)
def test_non_finite_pixels_given_to_the_processor_raise(model_and_processor, image):
    with pytest.raises(ImageError, match="NaN or infinite"):
        model_and_processor[1](images=[image], text="<|image_pad|>")


def test_finite_arrays_pass_through_unchanged(model_and_processor):
    processor = model_and_processor[1]
    image = shape_image("red")
    from_array = processor(images=[np.asarray(image)], text="<|image_pad|>")["pixel_values"]
    assert torch.equal(from_array, processor(images=[image], text="<|image_pad|>")["pixel_values"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_pixel_values_given_to_the_model_raise(model_and_processor, bad):
    model, processor = model_and_processor
    inputs = processor(images=[shape_image("red")], text="<|image_pad|> a red")
    inputs["pixel_values"][0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="pixel_values hold NaN or infinite values"), torch.no_grad():
        model(**inputs)
