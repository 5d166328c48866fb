"""One pair of autograd Functions shared by every fused backend: one op call forward, one backward.

The ops take ``init_slots`` and ``scale`` as given and return their gradients themselves (the
normalisation, scale and broadcast happen inside; see ``backends/contract.py``), so nothing but
the op runs around them.
"""

import torch

from . import backends


class ClusterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, init_slots, scale, backend):
        slots, lse = backends.kernels(backend).cluster_fwd(x, init_slots, scale)
        # The accumulation-precision slots, not the rounded output: delta = rowsum(grad * slots)
        # sums terms that cancel (softmax gradients sum to zero), so a bf16 output biased dscale.
        ctx.save_for_backward(x, init_slots, scale, slots, lse)
        ctx.backend = backend
        return slots.to(x.dtype, copy=True)  # a copy even in fp32: the saved slots must not be
        # the tensor a caller may modify in place

    @staticmethod
    def backward(ctx, grad):
        dx, d_init_slots, dscale = backends.kernels(ctx.backend).cluster_bwd(grad, *ctx.saved_tensors)
        return dx, d_init_slots, dscale, None


class DispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, init_slots, scale, slots, backend):
        out, lse = backends.kernels(backend).dispatch_fwd(x, init_slots, scale, slots)
        ctx.save_for_backward(x, init_slots, scale, slots, lse)  # not out: delta' = sum_s D dD needs no output
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad):
        return backends.kernels(ctx.backend).dispatch_bwd(grad, *ctx.saved_tensors) + (None,)
