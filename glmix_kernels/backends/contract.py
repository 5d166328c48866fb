"""The op contract every fused backend implements, stated once.

Four torch ops per backend; the autograd Functions (``_autograd.py``) call one forward, one backward:

    cluster_fwd(x, init_slots, scale)                     -> slots, lse
    cluster_bwd(grad, x, init_slots, scale, slots, lse)   -> dx, d_init_slots, dscale
    dispatch_fwd(x, init_slots, scale, slots)             -> out, lse
    dispatch_bwd(grad, x, init_slots, scale, slots, lse)  -> dx, d_init_slots, dscale, dslots

Inputs: ``x`` (B, L, C) float16/bfloat16/float32/float64, any strides; ``init_slots`` (B, S, C) or
(1, S, C) in x's dtype, any strides; ``scale`` a 0-d tensor, float32 or x's dtype; dispatch's
``slots`` (B, S, C) in x's dtype, any strides; ``grad`` shaped like the forward's output, x's dtype.

The ops compute ``qs = scale * q``, ``q = normalize(init_slots)``, themselves: the normalisation
in fp64 (its backward ``(dq - q <q, dq>) / ||init_slots||`` cancels, and is amplified for short
slots), then the product in the accumulation dtype, broadcast over the batch. The backwards
recompute the logits from ``x`` and ``qs`` and return ``d_init_slots`` summed over the batch for a
(1, S, C) ``init_slots`` and ``dscale = sum(dqs * q)``.

``lse`` holds the log-sum-exp statistics: (B, S) over pixels for clustering, (B, L) over slots
for dispatch. Clustering's ``slots`` stay in the accumulation dtype: ``cluster_bwd`` reads them
back for ``delta = rowsum(grad * slots)``, whose terms cancel (a rounded output would bias it);
the autograd Function returns them rounded to x's dtype. Dispatch's ``delta' = sum_s D dD`` comes
from the recomputed tile, so no forward output is saved.

The functions below allocate each op's outputs from its inputs (all contiguous): the shapes and
dtypes of the contract, used by the fake (meta) kernels and by the ops themselves.
"""

import torch


def acc_dtype(x):
    """The accumulation dtype: float64 for float64 ``x``, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cluster_fwd_outputs(x, init_slots, scale):
    """slots (B, S, C) and lse (B, S), both in the accumulation dtype."""
    B, _, C = x.shape
    S = init_slots.shape[1]
    return x.new_empty((B, S, C), dtype=acc_dtype(x)), x.new_empty((B, S), dtype=acc_dtype(x))


def _query_grads(x, init_slots, scale):
    """d_init_slots like ``init_slots`` (contiguous), dscale 0-d in scale's dtype."""
    return init_slots.new_empty(init_slots.shape), scale.new_empty(())


def cluster_bwd_outputs(grad, x, init_slots, scale, slots, lse):
    """dx like ``x`` (contiguous), d_init_slots, dscale."""
    return (x.new_empty(x.shape),) + _query_grads(x, init_slots, scale)


def dispatch_fwd_outputs(x, init_slots, scale, slots):
    """out (B, L, C) in x's dtype, lse (B, L) in the accumulation dtype."""
    return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=acc_dtype(x))


def dispatch_bwd_outputs(grad, x, init_slots, scale, slots, lse):
    """dx, d_init_slots, dscale, dslots (B, S, C) in x's dtype."""
    return (x.new_empty(x.shape),) + _query_grads(x, init_slots, scale) + (x.new_empty(slots.shape),)
