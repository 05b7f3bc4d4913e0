"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) as an `evaluate` module.

Load it offline from its folder: `evaluate.load(str(valign.eval.caption_metrics.COCO_CAPTION_METRIC))` (the
folder inside the installed package), or `evaluate.load("eval/metrics/coco_caption")` from the repository root.
evaluate copies this file alone into its module cache, so the scoring code is imported from the installed `valign`
package (valign.eval.caption_metrics) rather than duplicated here.
"""

import datasets
import evaluate

from valign.eval.caption_metrics import score_captions

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = """\
The COCO caption evaluation (pycocoevalcap): PTB tokenization, then BLEU-1..4, METEOR, ROUGE-L and CIDEr-D,
plus SPICE on request. Scores are pycocoevalcap's native values (BLEU/METEOR/ROUGE-L/SPICE in [0, 1], CIDEr
up to 10); papers report them multiplied by 100. CIDEr depends on the whole set of images scored together.
Requires Java on PATH.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of generated captions, one per image.
    references: list of lists of reference captions, one non-empty list per image.
    spice: also compute SPICE (default False; needs Stanford CoreNLP installed for pycocoevalcap).
Returns:
    dict with "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr" (and "SPICE").
Example:
    >>> from valign.eval.caption_metrics import COCO_CAPTION_METRIC
    >>> metric = evaluate.load(str(COCO_CAPTION_METRIC))
    >>> metric.compute(predictions=["a dog on a sofa"], references=[["a dog lying on a couch", "a brown dog"]])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    """COCO caption evaluation; each prediction is scored against the references at the same index."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]], spice: bool = False) -> dict[str, float]:
        # Positions stand in for COCO image ids (evaluate has already checked the two lists have equal length).
        ids = [str(i) for i in range(len(predictions))]
        by_id = dict(zip(ids, predictions, strict=True))
        return score_captions(by_id, dict(zip(ids, references, strict=True)), spice=spice)
