"""The backend registry: which backends exist, which can run on a device, and what each supports.

A fused backend supplies the four torch ops of the op contract, ``cluster_fwd``, ``cluster_bwd``,
``dispatch_fwd`` and ``dispatch_bwd``: their signatures, shapes and dtypes are stated once, in
``contract.py``. The autograd Functions (``_autograd.py``) call one op forward and one backward.
Adding a backend means one ``Backend`` line below and a module exposing those four names.
"""

import os
import warnings
from dataclasses import dataclass

import torch

_HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = _HALF_AND_FLOAT + (torch.float64,)


def _always(device_type):
    return None


def _triton_usable(device_type):
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors triton runs only under the interpreter (TRITON_INTERPRET=1)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _extension_usable(device_type):
    return _load_cpp().unavailable_reason(device_type)


# Import statements, not importlib: dynamo traces them even on first use, so a model compiled
# with fullgraph=True before any eager call still loads its kernels.
def _load_cpp():
    from . import cpp

    return cpp


def _load_cuda_emulated():
    from . import cuda_emulated

    return cuda_emulated


def _emulation_usable(device_type):
    return _load_cuda_emulated().unavailable_reason(device_type)


def _load_triton():
    from . import triton

    return triton


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple
    dtypes: tuple
    max_slots: int  # 0: no limit
    max_channels: int  # 0: no limit
    max_batch: int  # 0: no limit
    load: object  # () -> the kernels' module, imported lazily so nothing GPU-only loads with the
    # package; None: the reference, plain autograd
    unavailable: object = _always  # device_type -> None, or why not


BACKENDS = {
    b.name: b
    for b in (
        Backend("reference", ("cpu", "cuda"), _ALL_FLOATS, 0, 0, 0, None),
        Backend("cpu", ("cpu",), _ALL_FLOATS, 0, 0, 0, _load_cpp, _extension_usable),
        Backend("cuda", ("cuda",), _HALF_AND_FLOAT, 256, 1024, 65535, _load_cpp, _extension_usable),
        Backend("triton", ("cpu", "cuda"), _HALF_AND_FLOAT, 256, 1024, 0, _load_triton, _triton_usable),
        # The CUDA kernels on CPU tensors under a host emulation of CUDA: for tests, never auto.
        Backend("cuda_emulated", ("cpu",), _HALF_AND_FLOAT, 256, 1024, 65535, _load_cuda_emulated, _emulation_usable),
    )
}


def kernels(name):
    """Backend ``name``'s module of four kernels."""
    return BACKENDS[name].load()


# Preferred first; the Triton interpreter is never picked automatically. On CUDA, Triton leads
# until the GPU benchmarks say otherwise: its kernels' logic has run (under the interpreter)
# through the whole test suite, the CUDA kernels' only on the GPU, which they have yet to see.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def auto_order(device_type):
    """The backends ``auto`` tries for tensors on ``device_type``, preferred first."""
    return _AUTO_ORDER.get(device_type, ("reference",))


def check_name(name, device_type=None):
    """``name`` if it is ``"auto"`` or a registered backend, else a ValueError that lists them."""
    if name != "auto" and name not in BACKENDS:
        where = f"; available for {device_type}: {available_backends(device_type)}" if device_type else ""
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}{where}")
    return name


def why_unavailable(name, device="cpu"):
    """None if backend ``name`` can run on tensors on ``device``, else the reason."""
    b = BACKENDS[name]
    device_type = torch.device(device).type
    if device_type not in b.device_types:
        return f"it runs on {', '.join(b.device_types)} tensors"
    return b.unavailable(device_type)


def available_backends(device="cpu"):
    """Names of the backends usable for tensors on ``device``."""
    device_type = torch.device(device).type
    return [n for n, b in BACKENDS.items() if why_unavailable(n, device_type) is None]


def _unsupported(b, x, num_slots):
    """Why backend ``b`` cannot take these inputs, as (exception type, message), or None."""
    if x.dtype not in b.dtypes:
        return (
            TypeError,
            f"backend {b.name!r} does not support dtype {x.dtype} of x "
            f"(it supports {', '.join(str(d) for d in b.dtypes)})",
        )
    if b.max_slots and num_slots > b.max_slots:
        return ValueError, f"backend {b.name!r} supports at most {b.max_slots} slots, init_slots has {num_slots}"
    if b.max_batch and x.shape[0] > b.max_batch:  # CUDA's grid: the batch is a grid dimension
        return ValueError, f"backend {b.name!r} supports at most {b.max_batch} batch elements, x has {x.shape[0]}"
    if b.max_channels and x.shape[-1] > b.max_channels:
        return ValueError, f"backend {b.name!r} supports at most {b.max_channels} channels, x has {x.shape[-1]}"
    return None


class GLMixFallbackWarning(UserWarning):
    """``backend="auto"`` ran the reference, which materialises ``(B, S, L)`` tensors, because the
    fused backends present cannot take the inputs' shape or dtype. Filter it with ``warnings``."""


_warned = set()  # the fallback reasons already warned about: each is said once per process


# Run as it is at trace time under torch.compile (a traced warnings.warn would break the graph):
# the backend is chosen at trace time too, so the warning comes once, with the choice.
@torch.compiler.assume_constant_result
def _warn_fallback(reasons):
    msg = "backend='auto' runs the reference, which materialises (B, S, L) tensors: " + "; ".join(reasons)
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, GLMixFallbackWarning, stacklevel=4)  # points at the caller of soft_cluster/dispatch


def resolve(backend, x, num_slots):
    """The backend to run for these inputs: ``backend`` itself, checked, or the fastest that fits."""
    device_type = x.device.type
    if backend == "auto":
        refused = []  # why the fused backends that are there cannot take these inputs
        for name in auto_order(device_type):
            b = BACKENDS[name]
            if why_unavailable(name, device_type) is not None:
                continue
            problem = _unsupported(b, x, num_slots)
            if problem is None:
                if b.load is None and refused:
                    _warn_fallback(refused)
                return b
            refused.append(problem[1])
        return BACKENDS["reference"]
    check_name(backend, device_type)
    b = BACKENDS[backend]
    why = why_unavailable(backend, device_type)
    if why is not None:
        raise ValueError(
            f"backend {backend!r} is not available for {device_type} tensors: {why}; "
            f"available: {available_backends(device_type)}"
        )
    problem = _unsupported(b, x, num_slots)
    if problem is not None:
        exc, msg = problem
        raise exc(msg)
    return b
