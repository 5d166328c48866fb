"""Triton-specific checks: the interpreter's bf16 workaround, a fuzzing find, the tiled and split-L
launch paths, direct calls of the ops, pinned tile configs, the device guard and a scale in x's
dtype. Accuracy across dtypes, strides and gradients, opcheck and torch.compile are in
test_ops.py, for every backend.

Without CUDA the kernels run under the Triton interpreter, which must be switched on before the
kernels are defined (the first call into the backend).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import glmix_kernels as gk  # noqa: E402
from _helpers import TOL, Case, assert_close_normwise, check_against_reference  # noqa: E402
from glmix_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in gk.available_backends(DEVICE), reason=f"no triton backend for {DEVICE}")


def _ops():
    from glmix_kernels.backends import triton as tb

    return tb


@pytest.mark.skipif(DEVICE != "cpu", reason="the upcast is an interpreter workaround")
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_bf16_dots_upcast_only_when_interpreting(op):
    tb = _ops()
    assert tb.kernels.INTERPRET
    x = torch.zeros(1, 1, 1)
    assert tb._upcast(x.bfloat16()) and not tb._upcast(x.half()) and not tb._upcast(x)
    # The interpreter's own bf16 dot is wrong: without the upcast this is far from the reference.
    check_against_reference(Case(2, 40, 48, 24, "nchw", broadcast=True, dtype=torch.bfloat16), op, "triton")


def test_bf16_dispatch_delta_from_recomputed_probabilities():
    """Fuzzing found dscale -1.2e-2 against an exact 9.3e-7 here, when delta' was rowsum(Hg * out):
    the bf16 forward rounds D before the value product, so that sum no longer matched the
    sum_s D dD of the D the backward recomputes, and dA = D (dD - delta') stopped summing to zero.
    """
    check_against_reference(Case(B=1, L=1, C=1, S=2, dtype=torch.bfloat16, device=DEVICE, seed=2), "dispatch", "triton")


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("shape", [(1, 77, 130, 40), (1, 77, 60, 40)], ids=["c-blocks", "one-c-block"])
def test_tiled_channels_slot_blocks_and_split_l(op, shape):
    """Shapes that take every tiling path: C over several C blocks (the last one partial) and all of
    C in one block (the hoisted operands; pixel_bwd summing the slot partials itself), S over several slot blocks of
    the split-L kernels, L over several chunks (plus a partial last tile)."""
    tb = _ops()
    B, L, C, S = shape
    cfg = tb.pick_config("slot_bwd", S, C, torch.float32)
    chunk_len, n_chunks = tb.plan_chunks(B, S, L, torch.device(DEVICE), cfg.block_s)
    assert S > cfg.block_s and n_chunks > 1 and L % chunk_len != 0
    assert (cfg.block_c >= C) == (C == 60)
    assert tb.pick_config("pixel_bwd", S, C, torch.float32).block_c < C
    check_against_reference(Case(B, L, C, S, "nchw", broadcast=True, device=DEVICE), op, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_split_l_logits_over_c_steps(monkeypatch, op, dtype):
    """The split-L kernels' path for wide C (stages 3-4), at a tiny shape: logits over all of C
    in ``score_c`` steps, sums over several C blocks, slot_bwd run (pixel_bwd without the sums)."""
    tb = _ops()
    pinned = tb.pick_config

    def looped(kernel, S, C, dtype, L=None):
        if kernel in tb.SPLIT_L_KERNELS:
            return tb.TileConfig(16, 16, 32, score_c=16)
        if kernel == "cluster_fwd_tile":
            return None  # cluster_fwd_chunk's steps over C, not one tile per chunk
        return tb.replace(pinned(kernel, S, C, dtype), block_c=16)

    monkeypatch.setattr(tb, "pick_config", looped)
    check_against_reference(
        Case(1, 45, 40, 20, "nchw", broadcast=True, dtype=dtype, device=DEVICE, seed=3), op, "triton"
    )


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_pixel_bwd_sums_slot_partials_when_one_tile_holds_s_and_c(monkeypatch, op):
    """All of S and C in one tile (glnet stage 1): every kernel reads its S x C operands once per
    program and makes qs itself (and the backward clustering's delta): no scaled_queries runs."""
    tb = _ops()
    cfg = tb.pick_config("pixel_bwd", 24, 32, torch.float16)
    assert cfg.block_s >= 24 and cfg.block_c >= 32
    queries = []
    monkeypatch.setattr(tb, "_queries", lambda *a: queries.append(a) or pytest.fail("scaled_queries ran"))
    check_against_reference(Case(2, 203, 32, 24, "nchw", dtype=torch.float16, device=DEVICE), op, "triton")
    assert not queries


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_keys_around_a_common_direction(op):
    """Pixels sharing a mean direction (an offset on x, as after a ReLU): the sums over pixels of
    dqs = dA K and of the slots P x cancel that direction, and a P or dA rounded to bf16 would
    not. With one bf16 product for each, clustering's d_init_slots is 1.9x the tolerance off
    here (0.2x with the hi/lo split)."""
    case = Case(1, 150, 64, 64, "nchw", dtype=torch.bfloat16, device=DEVICE, seed=0)
    case.x_base += 2.0
    check_against_reference(case, op, "triton")


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_pixel_bwd_sums_slot_partials_over_c_blocks_when_one_tile_holds_a_chunk(monkeypatch, op):
    """Few pixels, more channels than one tile holds (stages 3-4): each chunk is one pixel tile
    of all S slots, and pixel_bwd writes its slot sums C block by C block, normalising the
    (transposed, for clustering broadcast) init_slots itself; neither scaled_queries nor slot_bwd
    runs in the backward, and the forwards (cluster_fwd_tile, dispatch_fwd over C blocks)
    normalise them themselves too. Two chunks (the second partial) per batch element, two batch
    elements. fp16; bf16 takes the same path in test_ops.py (C=1024, L=45)."""
    tb = _ops()
    dtype = torch.float16
    # A chunk and a bit: one-tile chunks are CHUNK_QUANTUM pixels (32 interpreted, 128 on a GPU).
    B, L, C, S = 2, tb.kernels.CHUNK_QUANTUM + 8, 136, 5
    cfg = tb.pick_config("pixel_bwd", S, C, dtype, L)
    assert cfg.one_tile and cfg.block_c < C and cfg.block_l < L <= 2 * cfg.block_l
    launched, tiled, queries, backward = [], tb._tiled, tb._queries, tb._backward_kernels
    monkeypatch.setattr(tb, "_tiled", lambda name, *a: launched.append(name) or tiled(name, *a))
    monkeypatch.setattr(tb, "_queries", lambda *a: launched.append("scaled_queries") or queries(*a))
    monkeypatch.setattr(tb, "_backward_kernels", lambda *a, **k: launched.append("backward") or backward(*a, **k))
    case = Case(B, L, C, S, "nchw", op == "cluster", "transposed", dtype=dtype, device=DEVICE, seed=6)
    check_against_reference(case, op, "triton")
    bwd = launched[launched.index("backward") :]
    assert "pixel_bwd" in bwd and "slot_bwd" not in bwd and "scaled_queries" not in bwd
    assert "scaled_queries" not in launched and ("cluster_fwd_tile" in launched) == (op == "cluster")


def test_direct_op_calls_check_inputs():
    """The glmix_triton ops apply the public functions' rules and the backend's limits."""
    tb = _ops()
    x = torch.randn(2, 19, 24, device=DEVICE)
    s0 = torch.randn(1, 5, 24, device=DEVICE)
    scale = torch.tensor(1.7, device=DEVICE)
    with pytest.raises(ValueError, match="init_slots must have shape"):
        tb.cluster_fwd(x, s0[:, :, :-1], scale)
    with pytest.raises(TypeError, match="init_slots must have the same dtype"):
        tb.dispatch_fwd(x, s0.double(), scale, torch.randn(2, 5, 24, device=DEVICE))
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
            pinned = tb.pick_config(name, S, C, torch.bfloat16)
            assert len(tb._pinned(getattr(tb.kernels, name), pinned, C).configs) == 1
            assert pinned in tb.candidate_configs(name, S, C, torch.bfloat16)


def test_device_guard_follows_x():
    tb = _ops()
    assert not isinstance(tb._device_guard(torch.empty(0)), torch.cuda.device)

    class OnCuda1:  # the guard reads only the device; no GPU needed
        device = torch.device("cuda", 1)

    guard = tb._device_guard(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_scale_in_x_dtype():
    """A bf16 scale: dscale comes back in bf16 (summed in fp64, rounded once)."""
    case = Case(B=2, L=23, C=16, S=3, dtype=torch.bfloat16, device=DEVICE, seed=4)
    x, s0, _, slots = case.leaves(torch.bfloat16)
    scale = case.scale.to(DEVICE, torch.bfloat16).requires_grad_()
    gk.soft_dispatch(x, s0, scale, slots, backend="triton").backward(case.grad_out.to(DEVICE, torch.bfloat16))
    xr, s0r, scale_r, slots_r = (t.detach().cpu().double().requires_grad_() for t in (x, s0, scale, slots))
    reference.soft_dispatch(xr, s0r, scale_r, slots_r).backward(case.grad_out.to(torch.bfloat16).double())
    assert scale.grad.dtype == torch.bfloat16
    assert_close_normwise(scale.grad, scale_r.grad, TOL[torch.bfloat16], "dscale")
