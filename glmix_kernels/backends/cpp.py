"""The compiled extension (``glmix_kernels._C``): the ``"cpu"`` and ``"cuda"`` backends.

Its ops live in the ``glmix_kernels`` torch.library namespace with CPU and CUDA kernels; the
device of the tensors picks the kernel, so both backends share these four names.
"""
import torch

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


def __getattr__(name):  # the four kernels, looked up only once the extension loaded
    if name in ("cluster_fwd", "cluster_bwd", "dispatch_fwd", "dispatch_bwd"):
        return getattr(torch.ops.glmix_kernels, name)
    raise AttributeError(name)
