"""The local caption task's functions: lmms-eval's own coco_cap ones, re-exported so that `!function utils.X` in the
task YAML finds them beside it; `coco_doc_to_visual` reads the row's image instead of downloading its URL."""

from lmms_eval.tasks.coco_cap.utils import (  # noqa: F401  (named by the task YAML)
    coco_bleu1,
    coco_bleu2,
    coco_bleu3,
    coco_bleu4,
    coco_cider,
    coco_doc_to_visual,
    coco_meteor,
    coco_process_result_karpathy,
    coco_rougel,
)
