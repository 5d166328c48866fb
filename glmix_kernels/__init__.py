"""Fused soft clustering and dispatch for GLMix (NeurIPS 2024), with a reference GLNet.

    slots = soft_cluster(x, init_slots, scale)          # softmax over pixels, then aggregate
    out = soft_dispatch(x, init_slots, scale, slots)    # softmax over slots, then scatter

``backend="auto"`` picks the fastest backend available for the tensors' device;
``available_backends(device)`` lists them.
"""

import torch

from . import _export, _validate, reference
from ._autograd import ClusterFn, DispatchFn
from .backends import GLMixFallbackWarning, available_backends, resolve

__version__ = "0.1.0"
__all__ = ["soft_cluster", "soft_dispatch", "available_backends", "GLMixFallbackWarning", "reference", "__version__"]


def _autocast(device_type, *tensors):
    """Under autocast, run in the autocast dtype like a matmul would: fp64 and the scale keep theirs."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
        for t in tensors
    )


def soft_cluster(x, init_slots, scale, *, backend="auto"):
    """``softmax_L(scale * n(init_slots) @ n(x)^T) @ x``: slots ``(B, S, C)`` from pixels ``x`` ``(B, L, C)``.

    ``init_slots`` is ``(B, S, C)`` or ``(1, S, C)``; ``scale`` a 0-d tensor (learnable) or a float.
    """
    if isinstance(x, torch.Tensor):
        x, init_slots = _autocast(x.device.type, x, init_slots)
    x, init_slots, scale = _validate.cluster_inputs(x, init_slots, scale)
    b = resolve(backend, x, init_slots.shape[1])
    if b.load is None:
        return reference.soft_cluster(x, init_slots, scale)
    if torch.compiler.is_exporting():  # one node in the exported graph (see _export.py)
        return _export.soft_cluster(x, init_slots, scale, b.name)
    return ClusterFn.apply(x, init_slots, scale, b.name)


def soft_dispatch(x, init_slots, scale, slots, *, backend="auto"):
    """``softmax_S(scale * n(init_slots) @ n(x)^T)^T @ slots``: pixels ``(B, L, C)`` from ``slots`` ``(B, S, C)``."""
    if isinstance(x, torch.Tensor):
        x, init_slots, slots = _autocast(x.device.type, x, init_slots, slots)
    x, init_slots, scale, slots = _validate.dispatch_inputs(x, init_slots, scale, slots)
    b = resolve(backend, x, init_slots.shape[1])
    if b.load is None or x.shape[1] == 0:  # no pixels: nothing for a kernel to do
        return reference.soft_dispatch(x, init_slots, scale, slots)
    if torch.compiler.is_exporting():
        return _export.soft_dispatch(x, init_slots, scale, slots, b.name)
    return DispatchFn.apply(x, init_slots, scale, slots, b.name)
