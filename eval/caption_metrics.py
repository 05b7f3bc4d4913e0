"""COCO caption metrics, computed exactly as the COCO caption evaluation (pycocoevalcap) computes them.

`score_captions` runs the pipeline of `pycocoevalcap.eval.COCOEvalCap.evaluate`: the Stanford PTB tokenizer
(lower-cases, splits off and drops punctuation) on references and predictions, then BLEU-1..4 (corpus level,
"closest" reference length), METEOR 1.5, ROUGE-L (beta 1.2), CIDEr-D (sigma 6), and SPICE only when asked.

Scale: the returned values are pycocoevalcap's native ones. BLEU, METEOR, ROUGE-L and SPICE lie in [0, 1];
CIDEr-D is unbounded above (at most 10). Papers quote all of them multiplied by 100: "CIDEr 127.1" is 1.271 here.

Caveats that follow from the reference implementation:
- CIDEr's IDF weights come from the references of the images scored together, so CIDEr is only comparable
  with published numbers on the same full test split; scoring a single image always gives CIDEr 0.
- The tokenizer, METEOR and SPICE are Java programs: a Java runtime must be on PATH.
- METEOR's start-up (loading its paraphrase tables, ~15 s and ~0.9 GB) dominates small evaluations, so one
  METEOR process is kept alive and reused across calls; `close_meteor` stops it (it also stops at exit).
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as _spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

__all__ = [
    "COCO_CAPTION_METRIC",
    "METRIC_NAMES",
    "JavaNotFoundError",
    "SpiceUnavailableError",
    "check_references",
    "close_meteor",
    "require_java",
    "score_captions",
]

# The same scorer as an `evaluate` module: `evaluate.load(str(COCO_CAPTION_METRIC))`, source tree or installed wheel.
COCO_CAPTION_METRIC = Path(__file__).parent / "metrics" / "coco_caption"
# Names as COCOEvalCap.eval reports them (SPICE is added only when requested).
METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads into spice/lib on first use.
_SPICE_LIB_DIR = os.path.join(os.path.dirname(_spice_module.__file__), "lib")
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


class JavaNotFoundError(RuntimeError):
    """No `java` executable on PATH (pycocoevalcap's tokenizer, METEOR and SPICE are Java programs)."""


class SpiceUnavailableError(RuntimeError):
    """SPICE was requested but its Stanford CoreNLP models are not installed (they cannot be fetched offline)."""


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool = False,
) -> dict[str, float]:
    """Score one predicted caption per image against that image's reference captions.

    Args:
        predictions: image id -> generated caption (raw text; tokenization happens here).
        references: image id -> non-empty list of reference captions (raw text). Same ids as `predictions`.
        spice: also compute SPICE (slow, needs ~8 GB of Java heap and locally installed CoreNLP models).

    Returns:
        {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]} -> score, on
        pycocoevalcap's native scale (multiply by 100 for the numbers papers report).

    Raises:
        ValueError: ids differ between the two mappings, nothing to score, or a reference list is empty.
        JavaNotFoundError: no Java runtime on PATH.
        SpiceUnavailableError: `spice=True` but SPICE's CoreNLP models are missing.
    """
    _validate_inputs(predictions, references)
    require_java()
    if spice:
        _require_spice_models()

    image_ids = list(predictions)
    gts = _tokenize({image_id: list(references[image_id]) for image_id in image_ids})
    res = _tokenize({image_id: [predictions[image_id]] for image_id in image_ids})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = _METEOR.score(gts, res)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        scores["SPICE"] = float(_spice_module.Spice().compute_score(gts, res)[0])
    return scores


def _validate_inputs(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    # pycocoevalcap only asserts (or silently drops captions), so check here and say what is wrong.
    if not predictions:
        raise ValueError("No predictions to score.")
    missing_refs = [k for k in predictions if k not in references]
    missing_preds = [k for k in references if k not in predictions]
    if missing_refs or missing_preds:
        raise ValueError(
            "predictions and references must cover the same image ids; "
            f"without references: {missing_refs[:5]} ({len(missing_refs)} in all), "
            f"without a prediction: {missing_preds[:5]} ({len(missing_preds)} in all)."
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"Prediction for image {image_id!r} must be a str, got {type(caption).__name__}.")
    check_references(references)


def check_references(references: Mapping[Hashable, Sequence[str]]) -> None:
    """Raise ValueError unless every image has a non-empty list of non-blank reference captions (str)."""
    for image_id, captions in references.items():
        # A bare string is a Sequence[str] too, but would be scored as one reference per character.
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"References for image {image_id!r} must be a list of str, got {captions!r}.")
        if len(captions) == 0:
            raise ValueError(f"Image {image_id!r} has an empty reference list.")
        if not all(c.strip() for c in captions):
            raise ValueError(f"Image {image_id!r} has a blank reference caption: {list(captions)!r}.")


def require_java() -> None:
    """Raise :class:`JavaNotFoundError` unless a `java` executable is on PATH."""
    # Without this check pycocoevalcap fails with an unrelated-looking FileNotFoundError or KeyError.
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "COCO caption scoring (pycocoevalcap: PTB tokenizer, METEOR, SPICE) runs Java, but no `java` "
            "executable is on PATH. Install a Java runtime, e.g. `apt-get install default-jre-headless` "
            "(Debian/Ubuntu) or `conda install -c conda-forge openjdk`."
        )


def _require_spice_models() -> None:
    # pycocoevalcap's Spice() would otherwise try to download ~400 MB from stanford.edu and fail offline.
    missing = [jar for jar in _SPICE_CORENLP_JARS if not os.path.isfile(os.path.join(_SPICE_LIB_DIR, jar))]
    if missing:
        raise SpiceUnavailableError(
            f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} missing from {_SPICE_LIB_DIR}). "
            "pycocoevalcap downloads it on first use, which cannot work offline. On a connected machine fetch "
            f"{_SPICE_CORENLP_URL} and copy those two jars into that directory, or score without SPICE."
        )


def _tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenize {id: [caption, ...]} as COCOEvalCap does, guarding against misaligned output."""
    # The Java tokenizer reads one caption per line: a line break inside a caption (\n, \r, \u2028, ...)
    # would shift every later caption onto the wrong image. Collapsing whitespace yields the same tokens.
    flat = {k: [{"caption": " ".join(c.split())} for c in caps] for k, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize(flat)
    if any(len(tokenized.get(k, ())) != len(caps) for k, caps in captions.items()):
        raise RuntimeError("The PTB tokenizer returned fewer captions than it was given; check `java -version`.")
    return tokenized


class _MeteorServer:
    """One long-lived pycocoevalcap METEOR process, restarted if it died or a call failed."""

    def __init__(self) -> None:
        self._meteor: Meteor | None = None
        self._lock = threading.Lock()

    def score(self, gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> float:
        with self._lock:
            if self._meteor is None or self._meteor.meteor_p.poll() is not None:
                self._meteor = Meteor()
            try:
                return float(self._meteor.compute_score(gts, res)[0])
            except Exception:
                # A failed call leaves the stdio protocol out of step (and Meteor's own lock held): discard it.
                self._stop()
                raise

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        if meteor.lock.locked():
            meteor.lock.release()  # else Meteor.__del__ would block forever on garbage collection
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


_METEOR = _MeteorServer()
atexit.register(_METEOR.close)


def close_meteor() -> None:
    """Stop the cached METEOR Java process (about 0.9 GB); the next `score_captions` call starts a new one."""
    _METEOR.close()
