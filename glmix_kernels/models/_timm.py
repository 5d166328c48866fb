"""Registers the GLNet variants with timm when it is installed, so ``timm.create_model`` builds them."""
import warnings

from .factory import create_model, list_models


def _entrypoint(name):
    # timm calls entrypoints with its factory arguments; there are no hosted weights to fetch.
    def build(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: no weights are downloaded; build with pretrained=False and load "
                             "the authors' file with glmix_kernels.models.load_checkpoint")
        return create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name  # timm registers a model under its function's name
    return build


def register_with_timm():
    """Registers every variant with timm; returns whether timm was there to register with."""
    try:
        from timm.models import register_model
    except ImportError:
        return False
    except Exception as e:  # a broken install (e.g. a mismatched torchvision) must not break ours
        warnings.warn(f"timm is installed but failed to import ({e!r}); GLNet is not registered with it")
        return False
    for name in list_models():
        register_model(_entrypoint(name))
    return True
