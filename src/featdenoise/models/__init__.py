"""Networks of the paper: denoising ops and blocks, ImageNet ResNet/ResNeXt, small-image nets.

``create_model(name, **kwargs)`` builds any named model (``list_models()``); every model takes
float RGB (or gray) pixels in [0, 1], NCHW, and returns logits ``[N, num_classes]``.
"""

from featdenoise.models.denoise import DenoiseOptions, DenoisingBlock
from featdenoise.models.registry import (
    create_model,
    list_models,
    model_from_metadata,
    model_in_channels,
    model_label,
    model_metadata,
    model_num_classes,
)
from featdenoise.models.surgery import add_denoising, feature_modules

__all__ = ["DenoiseOptions", "DenoisingBlock", "add_denoising", "create_model", "feature_modules",
           "list_models", "model_from_metadata", "model_in_channels", "model_label",
           "model_metadata", "model_num_classes"]
