"""Every input rule of the public functions, in one place, with messages that name the argument."""

import numbers

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name, t, ndim, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")


def _check_like(name, t, x):
    if t.device != x.device:
        raise ValueError(f"{name} must be on the same device as x ({x.device}), got {t.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the same dtype as x ({x.dtype}), got {t.dtype}")


def _scale_tensor(scale, x):
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
        raise TypeError(f"scale must be a 0-d tensor or a Python float, got {type(scale).__name__}")
    if not isinstance(scale, torch.Tensor):
        return torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if scale.numel() != 1:
        raise ValueError(f"scale must be a 0-d (or one-element) tensor, got shape {tuple(scale.shape)}")
    if scale.device != x.device:
        raise ValueError(f"scale must be on the same device as x ({x.device}), got {scale.device}")
    if scale.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"scale must have x's dtype ({x.dtype}) or float32, got {scale.dtype}")
    return scale if scale.dim() == 0 else scale.reshape(())  # no view op for a 0-d scale


def _slot_inputs(x, init_slots, scale):
    _check_tensor("x", x, 3, "of shape (B, L, C)")
    _check_tensor("init_slots", init_slots, 3, "of shape (B, S, C) or (1, S, C)")
    _check_like("init_slots", init_slots, x)
    B, L, C = x.shape
    Bs, S, Cs = init_slots.shape
    if B < 1 or C < 1:
        raise ValueError(f"x must have B >= 1 and C >= 1, got shape {tuple(x.shape)}")
    if Bs not in (1, B) or Cs != C or S < 1:
        raise ValueError(
            f"init_slots must have shape ({B}, S, {C}) or (1, S, {C}) with S >= 1 "
            f"to match x of shape {tuple(x.shape)}, got {tuple(init_slots.shape)}"
        )
    return x, init_slots, _scale_tensor(scale, x)


def cluster_inputs(x, init_slots, scale):
    """Checks ``soft_cluster``'s inputs; returns them with ``scale`` as a 0-d tensor."""
    x, init_slots, scale = _slot_inputs(x, init_slots, scale)
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one pixel (L >= 1) for clustering, got shape {tuple(x.shape)}")
    return x, init_slots, scale


def dispatch_inputs(x, init_slots, scale, slots):
    """Checks ``soft_dispatch``'s inputs; returns them with ``scale`` as a 0-d tensor."""
    x, init_slots, scale = _slot_inputs(x, init_slots, scale)
    _check_tensor("slots", slots, 3, "of shape (B, S, C)")
    _check_like("slots", slots, x)
    want = (x.shape[0], init_slots.shape[1], x.shape[2])
    if tuple(slots.shape) != want:
        raise ValueError(f"slots must have shape {want} (B of x, S of init_slots, C of x), got {tuple(slots.shape)}")
    return x, init_slots, scale, slots
