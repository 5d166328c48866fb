"""The reference GLNet (GLMix backbone) on the package's fused soft clustering / dispatch.

    model = create_model("glnet_4g", backend="auto")
    load_checkpoint(model, "glnet_4g.pth")     # the authors' released file
    model.set_backend("reference")             # switch every GLMix block's ops

Importing this module registers the variants with timm when timm is installed.
"""

from ._timm import register_with_timm
from .factory import FeatureInfo, GLNetFeatures, create_model, list_models, load_checkpoint
from .glnet import (
    BasicLayer,
    DropPath,
    GLMixBlock,
    GLNet,
    GLNetTokenLabeling,
    LayerNorm2d,
    LayerScale,
    MHSABlock,
    MHSANCHWBlock,
)

__all__ = [
    "create_model",
    "list_models",
    "load_checkpoint",
    "GLNet",
    "GLNetFeatures",
    "FeatureInfo",
    "GLNetTokenLabeling",
    "GLMixBlock",
    "MHSABlock",
    "MHSANCHWBlock",
    "BasicLayer",
    "DropPath",
    "LayerNorm2d",
    "LayerScale",
]

TIMM_REGISTERED = register_with_timm()
