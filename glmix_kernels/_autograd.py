"""One pair of autograd Functions shared by every fused backend.

The Functions see ``qs = scale * normalize(init_slots)`` rather than the raw slots and scale:
autograd then carries ``dqs`` back through the normalisation, the scale (``dscale = sum(dqs * q)``)
and the broadcast of ``(1, S, C)`` slots, so the kernels only ever handle the ``(S, L)`` part.
"""
import torch
import torch.nn.functional as F

from . import backends


def scaled_queries(init_slots, scale, batch):
    """``scale * normalize(init_slots)`` in the kernels' accumulation dtype, expanded to ``batch``."""
    acc = torch.float64 if init_slots.dtype == torch.float64 else torch.float32
    # Normalised in fp64 (a small (B, S, C) tensor): its backward, (dq - q <q, dq>) / r, cancels
    # and is amplified by 1 / r, so in fp32 a short slot's gradient would be mostly rounding.
    # Contiguous from the cast on: pooled slots arrive as an NCHW-strided view, and every op of
    # the normalisation and its backward ran about 15% slower on those strides.
    q = F.normalize(init_slots.to(torch.float64, memory_format=torch.contiguous_format), dim=-1).to(acc)
    return (scale.to(acc) * q).expand(batch, -1, -1)


class ClusterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qs, backend):
        slots, lse = backends.kernels(backend).cluster_fwd(x, qs)
        # The accumulation-precision slots, not the rounded output: delta = rowsum(grad * slots)
        # sums terms that cancel (softmax gradients sum to zero), so a bf16 output biased dscale.
        ctx.save_for_backward(x, qs, slots, lse)
        ctx.backend = backend
        return slots.to(x.dtype, copy=True)  # a copy even in fp32: the saved slots must not be
        # the tensor a caller may modify in place

    @staticmethod
    def backward(ctx, grad):
        x, qs, slots, lse = ctx.saved_tensors
        dx, dqs = backends.kernels(ctx.backend).cluster_bwd(grad, x, qs, slots, lse)
        return dx, dqs, None


class DispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qs, slots, backend):
        out, lse = backends.kernels(backend).dispatch_fwd(x, qs, slots)
        ctx.save_for_backward(x, qs, slots, lse)  # not out: delta' = sum_s D dD needs no output
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad):
        x, qs, slots, lse = ctx.saved_tensors
        dx, dqs, dslots = backends.kernels(ctx.backend).dispatch_bwd(grad, x, qs, slots, lse)
        return dx, dqs, dslots, None


# Temporary, until the contract's autograd layer lands: the Functions for backends whose ops take
# init_slots and scale themselves (the triton backend).
class ContractClusterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, init_slots, scale, backend):
        slots, lse = backends.kernels(backend).cluster_fwd(x, init_slots, scale)
        ctx.save_for_backward(x, init_slots, scale, slots, lse)
        ctx.backend = backend
        return slots.to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        dx, d_init, dscale = backends.kernels(ctx.backend).cluster_bwd(grad, *ctx.saved_tensors)
        return dx, d_init, dscale, None


class ContractDispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, init_slots, scale, slots, backend):
        out, lse = backends.kernels(backend).dispatch_fwd(x, init_slots, scale, slots)
        ctx.save_for_backward(x, init_slots, scale, slots, lse)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad):
        return backends.kernels(ctx.backend).dispatch_bwd(grad, *ctx.saved_tensors) + (None,)
