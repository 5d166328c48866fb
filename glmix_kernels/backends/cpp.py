"""The compiled extension (``glmix_kernels._C``): the ``"cpu"`` and ``"cuda"`` backends.

Its ops live in the ``glmix_kernels`` torch.library namespace with CPU and CUDA kernels; the
device of the tensors picks the kernel, so both backends share these four names. Their fake
(meta) implementations below give torch.compile and torch.library.opcheck the output shapes and
dtypes without running a kernel: outputs are contiguous, ``lse``, ``dqs`` and clustering's
``slots`` in ``qs``'s dtype (the accumulation dtype), everything else in ``x``'s.
"""
import sys

import torch

from . import registrations

try:
    from .. import _C  # noqa: F401  (registers torch.ops.glmix_kernels.*)
    _LOAD_ERROR = None
except ImportError as e:  # a pure-Python install, or a build without a compiler
    _LOAD_ERROR = e


def unavailable_reason(device_type):
    if _LOAD_ERROR is not None:
        return f"the C++ extension glmix_kernels._C is not built ({_LOAD_ERROR})"
    if device_type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("glmix_kernels::cluster_fwd", "CUDA"):
            return "the C++ extension was built without CUDA"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


if _LOAD_ERROR is None:
    @torch.library.register_fake("glmix_kernels::cluster_fwd")
    def _cluster_fwd_fake(x, qs):
        B, _, C = x.shape
        S = qs.shape[1]
        return qs.new_empty(B, S, C), qs.new_empty(B, S)

    @torch.library.register_fake("glmix_kernels::cluster_bwd")
    def _cluster_bwd_fake(grad, x, qs, slots, lse):
        return x.new_empty(x.shape), qs.new_empty(qs.shape)

    @torch.library.register_fake("glmix_kernels::dispatch_fwd")
    def _dispatch_fwd_fake(x, qs, slots):
        B, L, _ = x.shape
        return x.new_empty(x.shape), qs.new_empty(B, L)

    @torch.library.register_fake("glmix_kernels::dispatch_bwd")
    def _dispatch_bwd_fake(grad, x, qs, slots, lse):
        return x.new_empty(x.shape), qs.new_empty(qs.shape), slots.new_empty(slots.shape)

    cluster_fwd = torch.ops.glmix_kernels.cluster_fwd
    cluster_bwd = torch.ops.glmix_kernels.cluster_bwd
    dispatch_fwd = torch.ops.glmix_kernels.dispatch_fwd
    dispatch_bwd = torch.ops.glmix_kernels.dispatch_bwd

    registrations.register(sys.modules[__name__])
