"""The math of GLMix's global branch in plain PyTorch: the single source of truth.

Every fused backend is tested against these functions, the model's ``"reference"`` backend calls
them, and the benchmarks time them as the eager baseline. They materialise the ``(B, S, L)``
logits on purpose: that is what the fused kernels avoid.
"""

import torch.nn.functional as F


def assignment_logits(x, init_slots, scale):
    """``A = scale * n(init_slots) @ n(x)^T``, shape ``(B, S, L)``, in ``x``'s dtype."""
    k = F.normalize(x, dim=-1)
    q = F.normalize(init_slots, dim=-1)
    return scale.to(x.dtype) * (q @ k.transpose(-1, -2))


def soft_cluster(x, init_slots, scale):
    """Slots ``softmax_L(A) @ x``, shape ``(B, S, C)``."""
    p = assignment_logits(x, init_slots, scale).softmax(dim=-1)
    return p @ x


def soft_dispatch(x, init_slots, scale, slots):
    """Pixels ``softmax_S(A)^T @ slots``, shape ``(B, L, C)``."""
    d = assignment_logits(x, init_slots, scale).softmax(dim=-2)
    return d.transpose(-1, -2) @ slots


def slot_assignment(x, init_slots, scale):
    """The dispatch weights ``softmax_S(A)``, shape ``(B, S, L)``: what a visualisation draws."""
    return assignment_logits(x, init_slots, scale).softmax(dim=-2)
