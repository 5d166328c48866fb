"""Registers the GLNet variants with timm when it is installed, so ``timm.create_model`` builds them."""

import sys
import warnings

import torch

from .factory import create_model, list_models


def _entrypoint(name):
    # timm calls entrypoints with its factory arguments; there are no hosted weights to fetch.
    def build(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        if pretrained:
            raise ValueError(
                f"{name}: no weights are downloaded; build with pretrained=False and load "
                "the authors' file with glmix_kernels.models.load_checkpoint"
            )
        return create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name  # timm registers a model under its function's name
    return build


# Kept alive for the process: the schemas defined by _define_missing_torchvision_ops.
_TORCHVISION_LIB = None


def _define_missing_torchvision_ops(error):
    """Lets torchvision's pure-Python part import when its compiled ops cannot load (e.g. PyPI's
    CUDA wheel beside a CPU-only torch): it then registers fake kernels for ``nms``/``qnms``
    without checking that they exist, and fails. timm needs only that Python part (transforms,
    FrozenBatchNorm2d), so the two schemas are defined here; calling them still raises, as
    torchvision's own check says. Returns whether ``error`` was that failure."""
    global _TORCHVISION_LIB
    if "torchvision::" not in str(error) or "does not exist" not in str(error):
        return False
    # The failed import left its loaded submodules behind; importing again would fail again.
    extension = sys.modules.get("torchvision.extension")
    if extension is None or extension._has_ops() or _TORCHVISION_LIB is not None:
        return False
    _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _TORCHVISION_LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def _import_timm_register_model():
    try:
        from timm.models import register_model
    except RuntimeError as e:
        if not _define_missing_torchvision_ops(e):
            raise
        from timm.models import register_model
    return register_model


def register_with_timm():
    """Registers every variant with timm; returns whether timm was there to register with."""
    try:
        register_model = _import_timm_register_model()
    except ImportError:
        return False
    except Exception as e:  # a broken install (e.g. a mismatched torchvision) must not break ours
        warnings.warn(f"timm is installed but failed to import ({e!r}); GLNet is not registered with it", stacklevel=2)
        return False
    for name in list_models():
        register_model(_entrypoint(name))
    return True
