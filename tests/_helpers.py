"""Shared test utilities: random GLMix inputs in every layout, and normwise comparisons."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glmix_kernels.backends import BACKENDS, why_unavailable

FUSED = [n for n in BACKENDS if BACKENDS[n].load is not None]
DEVICES = ["cpu", "cuda"]

# Normwise relative tolerance (max |err| / max |expected|) per input dtype. fp16/bf16 kernels keep
# fp32 accumulators, so the error is a few output roundings (2^-11, 2^-8) plus the rounding of
# the probabilities fed to the value products.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


class OpLog(TorchDispatchMode):
    """The operators dispatched inside it, by packet name (e.g. ``"glmix_kernels.cluster_fwd"``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def backend_params(names=FUSED, devices=DEVICES):
    """(backend, device) pairs as pytest params: a backend absent here skips with its reason."""
    return [pytest.param(n, d, id=f"{n}-{d}") for n in names for d in devices if d in BACKENDS[n].device_types]


def require(backend, device):
    why = why_unavailable(backend, device)
    if why is not None:
        pytest.skip(f"backend {backend!r} on {device}: {why}")


def assert_close_normwise(actual, expected, tol, what, floor=0.1):
    """max |actual - expected| <= tol * max(max |expected|, floor).

    The floor is for gradients that are exactly zero in exact arithmetic (one pixel for
    clustering, one slot for dispatch): a kernel returns rounding noise of its O(1) intermediates.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element never written?)"
    scale = expected.abs().max().clamp_min(floor)
    err = (actual - expected).abs().max() / scale
    assert err <= tol, f"{what}: normwise error {err:.3e} > {tol:.1e}"


def check_against_reference(case, op, backend, tol=None):
    with poisoned_and_deterministic():
        out, grads = case.run(op, backend, case.dtype)
    ref_out, ref_grads = case.expected(op)
    tol = tol or TOL[case.dtype]
    assert out.dtype == case.dtype
    assert_close_normwise(out, ref_out, tol, f"{op} output")
    names = ["dx", "dinit_slots", "dscale", "dslots"]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == (torch.float32 if name == "dscale" else case.dtype), name
        assert_close_normwise(g, r, tol, f"{op} {name}")


@contextlib.contextmanager
def poisoned_and_deterministic():
    """torch.empty fills NaN (so an unwritten output element shows) and kernels must be deterministic."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class Case:
    """Random inputs for one op call. ``x`` and ``init_slots`` are views of leaf tensors
    (``x_base``, ``slots0_base``) so strided layouts are tested without copies."""

    def __init__(
        self,
        B,
        L,
        C,
        S,
        layout="contiguous",
        broadcast=False,
        slots_layout="contiguous",
        dtype=torch.float32,
        device="cpu",
        seed=0,
        scale=None,
    ):
        g = torch.Generator().manual_seed(seed)
        self.B, self.L, self.C, self.S = B, L, C, S
        self.layout, self.slots_layout, self.dtype, self.device = layout, slots_layout, dtype, device

        def rand(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        self.x_base = {
            "contiguous": rand(B, L, C),  # (B, L, C)
            "nchw": rand(B, C, L),  # an NCHW map seen as (B, L, C): strides (C*L, 1, L)
            "sliced": rand(B, L, 2 * C),
        }[layout]  # every other channel: C stride 2
        Bs = 1 if broadcast else B
        self.slots0_base = {"contiguous": rand(Bs, S, C), "transposed": rand(Bs, C, S)}[slots_layout]
        # Learned temperatures grow well past C**-0.5; a large one makes the softmaxes peaky.
        self.scale = torch.tensor(scale if scale is not None else 4.0 + 4.0 * torch.rand((), generator=g).item())
        self.slots = {"contiguous": rand(B, S, C), "transposed": rand(B, C, S)}[slots_layout]  # dispatch's input
        self.grad_slots = rand(B, S, C)
        self.grad_out = rand(B, L, C)

    def view_x(self, base):
        return {"contiguous": base, "nchw": base.transpose(1, 2), "sliced": base[..., ::2]}[self.layout]

    def view_slots(self, base):
        """``init_slots`` and dispatch's ``slots`` as (B, S, C): views of (B, C, S) when transposed."""
        return base if self.slots_layout == "contiguous" else base.transpose(1, 2)

    def leaves(self, dtype):
        """Fresh leaf tensors in ``dtype`` on the case's device (scale stays fp32 unless fp64)."""
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        return [
            t.to(self.device, d, copy=True).requires_grad_()
            for t, d in ((self.x_base, dtype), (self.slots0_base, dtype), (self.scale, sdtype), (self.slots, dtype))
        ]

    def run(self, op, backend, dtype):
        """Output and gradients (x, init_slots, scale[, slots]) of ``op`` with ``backend`` in ``dtype``."""
        import glmix_kernels

        xb, s0b, scale, slots = self.leaves(dtype)
        x, s0 = self.view_x(xb), self.view_slots(s0b)
        if op == "cluster":
            out = glmix_kernels.soft_cluster(x, s0, scale, backend=backend)
            out.backward(self.grad_slots.to(self.device, dtype))
            return out.detach(), [xb.grad, s0b.grad, scale.grad]
        out = glmix_kernels.soft_dispatch(x, s0, scale, self.view_slots(slots), backend=backend)
        out.backward(self.grad_out.to(self.device, dtype))
        return out.detach(), [xb.grad, s0b.grad, scale.grad, slots.grad]

    def expected(self, op):
        """The reference in float64 on the same inputs, rounded to the tested dtype first."""
        rounded = Case.__new__(Case)
        rounded.__dict__.update(self.__dict__)
        rounded.x_base = self.x_base.to(self.dtype).double()
        rounded.slots0_base = self.slots0_base.to(self.dtype).double()
        for name in ("slots", "grad_slots", "grad_out"):
            setattr(rounded, name, getattr(self, name).to(self.dtype).double())
        return rounded.run(op, "reference", torch.float64)
