"""The seven released GLNet variants by name, and loading of the authors' checkpoints."""

import torch
from torch import nn

from .glnet import GLNet, GLNetTokenLabeling


class FeatureInfo(list):
    """timm's ``feature_info``: one dict per output (``num_chs``, ``reduction``, ``module``), with
    timm's accessors."""

    def channels(self):
        return [f["num_chs"] for f in self]

    def reduction(self):
        return [f["reduction"] for f in self]

    def module_name(self):
        return [f["module"] for f in self]

    def get_dicts(self):
        return [dict(f) for f in self]


class GLNetFeatures(nn.Module):
    """A GLNet as a dense-prediction backbone (timm's ``features_only``): ``forward`` returns the
    maps of the stages in ``out_indices``; the stages after the last of them, the final norm and
    the head are dropped. ``model`` keeps the authors' parameter names under ``model.``."""

    def __init__(self, model, out_indices=(0, 1, 2, 3)):
        super().__init__()
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_norm=True))
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info[i] for i in self.out_indices)
        self.pretrained_cfg = model.pretrained_cfg

    def set_backend(self, backend):
        self.model.set_backend(backend)
        return self

    def set_grad_checkpointing(self, enable=True):
        self.model.set_grad_checkpointing(enable)

    def forward(self, x):
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)


# The GLMix-specific settings shared by the 4G/9G/16G family (overlapped downsampling, conv
# position embedding, hybrid third stage, attention-only last stage).
_HYBRID = dict(
    depth=[4, 4, 18, 4],
    mlp_ratios=[3, 3, 3, 3],
    head_dim=32,
    norm_layer=nn.BatchNorm2d,
    mixing_modes=("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"),
    local_dw_ks=5,
    slot_init="ada_avgpool",
    num_slots=64,
    cpe_ks=3,
    downsample_style="ovlp",
    transition_layout="proj.norm",
    mlp_dw=True,
)
# The Swin-T-like layout (non-overlapped downsampling, norm before each transition conv).
_STL = dict(
    depth=[2, 2, 6, 2],
    embed_dim=[96, 192, 384, 768],
    mlp_ratios=[4, 4, 4, 4],
    head_dim=32,
    norm_layer=nn.BatchNorm2d,
    mixing_modes=("glmix", "glmix", "glmix", "mha"),
    local_dw_ks=5,
    num_slots=64,
    transition_layout="norm.proj",
)

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


def create_model(name, *, backend="auto", features_only=False, out_indices=(0, 1, 2, 3), **kwargs):
    """Builds variant ``name`` (randomly initialised); ``kwargs`` override its GLNet keywords
    (``num_classes``, ``drop_path_rate``, ...). ``backend`` runs its GLMix blocks' fused ops.

    ``features_only=True`` returns a ``GLNetFeatures`` backbone instead: its forward gives the
    stage maps picked by ``out_indices`` (strides 4, 8, 16, 32), described by ``feature_info``.
    """
    if name not in _VARIANTS:
        raise ValueError(f"unknown GLNet variant {name!r}; known: {list_models()}")
    cls, config = _VARIANTS[name]
    model = cls(**{**config, **kwargs}, backend=backend)
    return GLNetFeatures(model, out_indices) if features_only else model


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
