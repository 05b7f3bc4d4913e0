"""valign: SigLIP → MLP projector → Qwen2.5 with hybrid image attention (arXiv 2503.19508)."""

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
