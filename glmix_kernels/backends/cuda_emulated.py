"""The ``"cuda_emulated"`` backend: the CUDA kernels of ``csrc/cuda/`` run on CPU tensors under a host
emulation of the CUDA execution model (``docs/emulation.md``), for testing them without a GPU.

Built into the extension only with ``GLMIX_CUDA_EMULATION=1`` at install; its ops live in the
``glmix_emulated`` torch.library namespace (CPU kernels), beside the ``glmix_kernels`` ones.
"""

import contextlib
import sys

import torch

from . import cpp, registrations


def _built():
    if cpp.unavailable_reason("cpu") is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("glmix_emulated::cluster_fwd", "CPU")
    except RuntimeError:  # a build without the emulation never defines the glmix_emulated ops
        return False


# Looked up once at import: torch.compile traces unavailable_reason, but not the dispatcher query.
_BUILT = _built()


def unavailable_reason(device_type):
    why = cpp.unavailable_reason("cpu")
    if why is not None:
        return why
    if not _BUILT:
        return "the C++ extension was built without the CUDA emulation (set GLMIX_CUDA_EMULATION=1 at install)"
    return None


@contextlib.contextmanager
def thread_order(order, seed=0):
    """Run the emulated CUDA threads of each block in ``order`` between barriers: "forward",
    "reverse" or "random" (seeded); blocks likewise. Forward is the default."""
    torch.ops.glmix_emulated.set_thread_order(order, seed)
    try:
        yield
    finally:
        torch.ops.glmix_emulated.set_thread_order("forward", 0)


if unavailable_reason("cpu") is None:
    cpp.register_fakes("glmix_emulated")
    cluster_fwd = torch.ops.glmix_emulated.cluster_fwd
    cluster_bwd = torch.ops.glmix_emulated.cluster_bwd
    dispatch_fwd = torch.ops.glmix_emulated.dispatch_fwd
    dispatch_bwd = torch.ops.glmix_emulated.dispatch_bwd

    registrations.register(sys.modules[__name__])  # FLOP formulas and decompositions, as the other backends
