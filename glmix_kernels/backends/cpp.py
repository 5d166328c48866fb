"""The compiled extension (``glmix_kernels._C``): the ``"cpu"`` and ``"cuda"`` backends.

Its ops live in the ``glmix_kernels`` torch.library namespace with CPU and CUDA kernels; the
device of the tensors picks the kernel, so both backends share these four names. Their fake
(meta) implementations, for torch.compile and torch.library.opcheck, are the output allocations
of ``contract.py``.
"""

import sys

import torch

from . import contract, registrations

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


def register_fakes(ns):
    """The fake (meta) kernels of the four ops of torch.library namespace ``ns``: the contract's outputs."""
    for op in ("cluster_fwd", "cluster_bwd", "dispatch_fwd", "dispatch_bwd"):
        torch.library.register_fake(f"{ns}::{op}", getattr(contract, f"{op}_outputs"))


if _LOAD_ERROR is None:
    register_fakes("glmix_kernels")
    cluster_fwd = torch.ops.glmix_kernels.cluster_fwd
    cluster_bwd = torch.ops.glmix_kernels.cluster_bwd
    dispatch_fwd = torch.ops.glmix_kernels.dispatch_fwd
    dispatch_bwd = torch.ops.glmix_kernels.dispatch_bwd

    registrations.register(sys.modules[__name__])
