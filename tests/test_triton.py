"""Triton-specific checks: op registration, the interpreter's bf16 workaround, the tiled and split-L
launch paths, and torch.compile. Correctness across dtypes, strides and gradients is in test_ops.py.

Without CUDA the kernels run under the Triton interpreter, which must be switched on before the
kernels are defined (the first call into the backend).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import glmix_kernels as gk  # noqa: E402
from glmix_kernels import reference  # noqa: E402
from _helpers import TOL, Case, assert_close_normwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in gk.available_backends(DEVICE),
                                reason=f"no triton backend for {DEVICE}")


def _ops():
    from glmix_kernels.backends import triton as tb
    return tb


def _inputs(B, L, C, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, L, generator=g).to(DEVICE, dtype).transpose(1, 2)  # NCHW view
    s0 = torch.randn(1, S, C, generator=g).to(DEVICE, dtype)
    slots = torch.randn(B, S, C, generator=g).to(DEVICE, dtype)
    return x, s0, torch.tensor(1.7, device=DEVICE), slots


def _forward_backward(fn, x, s0, scale, slots, seed=1):
    """Both ops' outputs and the gradients of every input, under fixed random output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, s0, scale, slots)]
    c, d = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gc, gd = (torch.randn(t.shape, generator=g).to(t) for t in (c, d))
    torch.autograd.backward([c, d], [gc, gd])
    return [c.detach(), d.detach()] + [t.grad for t in leaves]


def _triton_pair(x, s0, scale, slots):
    return (gk.soft_cluster(x, s0, scale, backend="triton"),
            gk.soft_dispatch(x, s0, scale, slots, backend="triton"))


def _reference_pair(x, s0, scale, slots):
    return reference.soft_cluster(x, s0, scale), reference.soft_dispatch(x, s0, scale, slots)


def _assert_close_to_reference(got, x, s0, scale, slots, rtol):
    """``got`` against the float64 reference, errors relative to each tensor's largest entry."""
    want = _forward_backward(_reference_pair, *(t.double() for t in (x, s0, scale, slots)))
    names = ["slots", "out", "dx", "ds0", "dscale", "dslots"]
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1)
        assert err < rtol, f"{name}: max error {err:.2e} relative to its largest entry"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    tb = _ops()
    x, s0, scale, slots = _inputs(2, 19, 24, 5, dtype)
    c, c_lse = tb.cluster_fwd(x, s0, scale)
    assert c.dtype == torch.float32  # unrounded, for cluster_bwd's delta
    d, d_lse = tb.dispatch_fwd(x, s0, scale, slots)
    grad_c = torch.randn(c.shape, device=DEVICE).to(dtype)
    grad_d = torch.randn_like(d).transpose(1, 2).contiguous().transpose(1, 2)
    for op, args in [(tb.cluster_fwd, (x, s0, scale)),
                     (tb.cluster_bwd, (grad_c, x, s0, scale, c, c_lse)),
                     (tb.dispatch_fwd, (x, s0, scale, slots)),
                     (tb.dispatch_bwd, (grad_d, x, s0, scale, slots, d_lse))]:
        torch.library.opcheck(op, args)


def test_direct_op_calls_check_inputs():
    """The glmix_triton ops apply the public functions' rules and the backend's limits."""
    tb = _ops()
    x, s0, scale, slots = _inputs(2, 19, 24, 5, torch.float32)
    with pytest.raises(ValueError, match="init_slots must have shape"):
        tb.cluster_fwd(x, s0[:, :, :-1], scale)
    with pytest.raises(TypeError, match="init_slots must have the same dtype"):
        tb.dispatch_fwd(x, s0.double(), scale, slots)
    with pytest.raises(ValueError, match="at most 256 slots"):
        tb.cluster_fwd(x, torch.randn(1, 257, 24, device=DEVICE), scale)
    with pytest.raises(TypeError, match="does not support dtype"):
        tb.cluster_fwd(x.double(), s0.double(), scale.double())
    c, lse = tb.cluster_fwd(x, s0, scale)
    with pytest.raises(ValueError, match="grad must have shape"):
        tb.cluster_bwd(torch.zeros(2, 5, 23, device=DEVICE), x, s0, scale, c, lse)


def test_one_launch_config_pinned_per_kernel():
    """Without GLMIX_TRITON_AUTOTUNE a first call compiles one config per kernel and benchmarks
    nothing; the pinned config is among the autotuner's candidates."""
    tb = _ops()
    assert not tb.AUTOTUNE
    for name in tb.SPLIT_L_KERNELS + tb.PIXEL_KERNELS:
        for S, C in [(64, 64), (64, 512), (256, 64), (5, 1000)]:
            launcher = tb._pinned(getattr(tb.kernels, name), tb.pick_config(name, S, C, torch.bfloat16), C)
            assert len(launcher.configs) == 1
            assert tb.pick_config(name, S, C, torch.bfloat16) in tb.candidate_configs(name, S, C, torch.bfloat16)


def test_device_guard_follows_x():
    tb = _ops()
    guard = tb._device_guard(torch.empty(0, device="meta").new_empty(0, device="cpu"))
    assert not isinstance(guard, torch.cuda.device)

    class OnCuda1:  # the guard reads only the device; no GPU needed
        device = torch.device("cuda", 1)
    guard = tb._device_guard(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.skipif(DEVICE != "cpu", reason="the upcast is an interpreter workaround")
def test_bf16_dots_upcast_only_when_interpreting():
    tb = _ops()
    assert tb.kernels.INTERPRET
    x = torch.zeros(1, 1, 1)
    assert tb._upcast(x.bfloat16()) and not tb._upcast(x.half()) and not tb._upcast(x)
    # The interpreter's own bf16 dot is wrong: without the upcast this is far from the reference.
    x, s0, scale, slots = _inputs(2, 40, 48, 24, torch.bfloat16)
    _assert_close_to_reference(_forward_backward(_triton_pair, x, s0, scale, slots),
                               x, s0, scale, slots, rtol=3e-2)


def test_bf16_dispatch_delta_from_recomputed_probabilities():
    """Fuzzing found dscale -1.2e-2 against an exact 9.3e-7 here, when delta' was rowsum(Hg * out):
    the bf16 forward rounds D before the value product, so that sum no longer matched the
    sum_s D dD of the D the backward recomputes, and dA = D (dD - delta') stopped summing to zero.
    """
    case = Case(B=1, L=1, C=1, S=2, dtype=torch.bfloat16, device=DEVICE, seed=2)
    _, grads = case.run("dispatch", "triton", torch.bfloat16)
    _, want = case.expected("dispatch")
    for name, got, ref in zip(["dx", "ds0", "dscale", "dslots"], grads, want):
        assert_close_normwise(got, ref, TOL[torch.bfloat16], name)


def test_tiled_channels_slot_blocks_and_split_l():
    """Shapes that take every tiling path: C over several C blocks and C in one block (the hoisted
    operands), S over several slot blocks of the split-L kernels, L over several chunks (plus a
    partial last tile)."""
    tb = _ops()
    for B, L, C, S in [(1, 77, 520, 20), (1, 77, 100, 70)]:
        cfg = tb.pick_config("slot_bwd", S, C, torch.float32)
        chunk_len, n_chunks = tb.plan_chunks(B, S, L, torch.device(DEVICE), cfg.block_s)
        assert S > cfg.block_s and n_chunks > 1 and L % chunk_len != 0
        assert (cfg.block_c >= C) == (C == 100)
        assert tb.pick_config("pixel_bwd", S, C, torch.float32).block_c < C
        x, s0, scale, slots = _inputs(B, L, C, S, torch.float32)
        _assert_close_to_reference(_forward_backward(_triton_pair, x, s0, scale, slots),
                                   x, s0, scale, slots, rtol=1e-5)


def test_compile_fullgraph_matches_eager():
    x, s0, scale, slots = _inputs(2, 37, 32, 9, torch.float32)
    eager = _forward_backward(_triton_pair, x, s0, scale, slots)
    torch._dynamo.reset()
    compiled = _forward_backward(torch.compile(_triton_pair, fullgraph=True, backend="aot_eager"),
                                 x, s0, scale, slots)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scale_in_x_dtype():
    """A bf16 scale: dscale comes back in bf16 (summed in fp64, rounded once)."""
    case = Case(B=2, L=23, C=16, S=3, dtype=torch.bfloat16, device=DEVICE, seed=4)
    x, s0, _, slots = case.leaves(torch.bfloat16)
    scale = case.scale.to(DEVICE, torch.bfloat16).requires_grad_()
    gk.soft_dispatch(x, s0, scale, slots, backend="triton").backward(case.grad_out.to(DEVICE, torch.bfloat16))
    xr, s0r, scale_r, slots_r = (t.detach().double().requires_grad_() for t in (x, s0, scale, slots))
    reference.soft_dispatch(xr, s0r, scale_r, slots_r).backward(case.grad_out.to(torch.bfloat16).double())
    assert scale.grad.dtype == torch.bfloat16
    assert_close_normwise(scale.grad, scale_r.grad, TOL[torch.bfloat16], "dscale")
