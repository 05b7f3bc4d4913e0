"""valign: SigLIP → MLP projector → Qwen2.5 with hybrid image attention (arXiv 2503.19508)."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _loggers_quieted(*names: str) -> Iterator[None]:
    """Raise the given loggers to ERROR for the block only; their levels are restored after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# transformers' model code imports its quantizers, which import torchao (the int8 extra) when it is installed. On a
# CPU build of torch, torchao 0.18 then logs the CUDA kernels it cannot load, and torch 2.13 its deprecated Enum
# registrations: four lines before any output of every `valign` command, none about valign's use of torchao (CPU int8
# weights). They are quieted during this import only; later records of either logger show as usual. When transformers
# is imported first, as when a Hub checkpoint's remote code loads, this changes nothing. Goes when torchao stops both.
with _loggers_quieted("torchao", "torch.utils._pytree"):
    from .configuration_valign import ValignConfig
    from .modeling_valign import ValignForConditionalGeneration, ValignModel, ValignPreTrainedModel
    from .processing_valign import ValignProcessor
    from .train.assembly import from_backbones

__all__ = [
    "ValignConfig",
    "ValignForConditionalGeneration",
    "ValignModel",
    "ValignPreTrainedModel",
    "ValignProcessor",
    "from_backbones",
]
