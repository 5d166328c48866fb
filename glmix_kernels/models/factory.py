"""The seven released GLNet variants by name, and loading of the authors' checkpoints."""
import torch
from torch import nn

from .glnet import GLNet, GLNetTokenLabeling

# The GLMix-specific settings shared by the 4G/9G/16G family (overlapped downsampling, conv
# position embedding, hybrid third stage, attention-only last stage).
_HYBRID = dict(depth=[4, 4, 18, 4], mlp_ratios=[3, 3, 3, 3], head_dim=32, norm_layer=nn.BatchNorm2d,
               mixing_modes=("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"), local_dw_ks=5,
               slot_init="ada_avgpool", num_slots=64, cpe_ks=3, downsample_style="ovlp",
               transition_layout="proj.norm", mlp_dw=True)
# The Swin-T-like layout (non-overlapped downsampling, norm before each transition conv).
_STL = dict(depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4], head_dim=32,
            norm_layer=nn.BatchNorm2d, mixing_modes=("glmix", "glmix", "glmix", "mha"), local_dw_ks=5,
            num_slots=64, transition_layout="norm.proj")

_VARIANTS = {
    "glnet_stl": (GLNet, dict(_STL, slot_init="ada_avgpool")),
    "glnet_stl_paramslot": (GLNet, dict(_STL, slot_init="param")),
    "glnet_4g": (GLNet, dict(_HYBRID, embed_dim=[64, 128, 256, 512])),
    "glnet_9g": (GLNet, dict(_HYBRID, embed_dim=[96, 192, 384, 768])),
    "glnet_16g": (GLNet, dict(_HYBRID, embed_dim=[128, 256, 512, 1024], layerscale=1e-4)),
    "glnet_4g_tklb": (GLNetTokenLabeling, dict(_HYBRID, embed_dim=[64, 128, 256, 512])),
    "glnet_9g_tklb": (GLNetTokenLabeling, dict(_HYBRID, embed_dim=[96, 192, 384, 768])),
}


def list_models():
    """Names of the released GLNet variants."""
    return list(_VARIANTS)


def create_model(name, *, backend="auto", **kwargs):
    """Builds variant ``name`` (randomly initialised); ``kwargs`` override its GLNet keywords
    (``num_classes``, ``drop_path_rate``, ...). ``backend`` runs its GLMix blocks' fused ops."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown GLNet variant {name!r}; known: {list_models()}")
    cls, config = _VARIANTS[name]
    return cls(**{**config, **kwargs}, backend=backend)


def load_checkpoint(model, path, *, key=None, map_location="cpu", weights_only=True):
    """Loads an authors' checkpoint file into ``model`` strictly; returns the model.

    The file holds a dict with the state dict under ``"model"`` or ``"model_ema"`` (the first
    present, unless ``key`` names one), or a bare state dict. ``weights_only=False`` unpickles
    arbitrary objects (a training checkpoint's saved arguments, say): only for trusted files.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    if key is not None:
        state_dict = checkpoint[key]
    else:
        state_dict = next((checkpoint[k] for k in ("model", "model_ema") if k in checkpoint), checkpoint)
    model.load_state_dict(state_dict, strict=True)
    return model
