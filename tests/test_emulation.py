"""The CUDA emulation's detectors (docs/emulation.md), each shown to detect on a small broken
kernel, and the CUDA kernels put through them: results bitwise identical whichever order the
emulated threads run in, inputs inside NaN margins. The generic suite (test_ops.py) runs the
kernels over the "cuda_emulated" backend as over any other."""

import pytest
import torch

import glmix_kernels
from _helpers import Case, require

BACKEND = "cuda_emulated"
ORDERS = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]


@pytest.fixture(autouse=True)
def _emulation_built():
    require(BACKEND, "cpu")


def thread_order(order, seed):
    from glmix_kernels.backends import cuda_emulated

    return cuda_emulated.thread_order(order, seed)


def selftest(name, order="forward", seed=0):
    with thread_order(order, seed):
        return torch.ops.glmix_emulated.selftest(name)


def bits(t):
    """A tensor's bit patterns, so NaNs compare too."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


# ---------------------------------------------------------------- each detector detects


def test_a_missing_barrier_makes_the_orders_disagree():
    results = [bits(selftest("race", *o)) for o in ORDERS]
    assert any(not torch.equal(results[0], r) for r in results[1:])
    fixed = [selftest("no_race", *o) for o in ORDERS]
    assert all(torch.equal(fixed[0], f) for f in fixed[1:])
    assert torch.equal(fixed[0], (torch.arange(64) + 1).remainder(64).float())


def test_an_out_of_bounds_write_hits_the_sentinel():
    with pytest.raises(RuntimeError, match="out-of-bounds write"):
        selftest("one_past")


def test_shared_memory_starts_as_nan():
    assert torch.isnan(selftest("uninitialised")).all()


@pytest.mark.parametrize(
    "name,message",
    [
        ("early_exit", r"reached by 32 of 64 threads; the other 32 have exited"),
        ("split_barrier", r"threads wait at different barriers"),
        ("partial_mask", r"only full-warp shuffles"),
        ("divergent_warp", r"divergent warp"),
    ],
)
def test_barrier_and_shuffle_misuse_stops_with_a_message(name, message):
    with pytest.raises(RuntimeError, match=message):
        selftest(name)
    assert torch.equal(selftest("no_race"), (torch.arange(64) + 1).remainder(64).float())  # still usable


def test_shuffles_exchange_the_right_lanes():
    t = torch.arange(64)
    lane = t % 32
    want = 496 * 1000.0 + (t - lane + (lane ^ 5)).float()  # 496 = 0 + 1 + ... + 31
    assert torch.equal(selftest("warp_sums"), want)


# ---------------------------------------------------------------- the CUDA kernels under them

# (B, L, C, S, x layout, broadcast): one slot tile and several (S = 70 > 64, and C = 384 whose
# backward tiles hold 8 slots), tails in pixels and slots, several chunks of several tiles.
ORDER_SHAPES = [
    (2, 150, 16, 70, "nchw", True),
    (1, 37, 384, 12, "contiguous", False),
    (3, 45, 24, 5, "sliced", False),
]


@pytest.mark.parametrize("shape", ORDER_SHAPES, ids=lambda s: "B{}-L{}-C{}-S{}-{}".format(*s[:5]))
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_kernels_are_bitwise_identical_in_every_thread_order(op, shape):
    B, L, C, S, layout, broadcast = shape
    case = Case(B, L, C, S, layout, broadcast, seed=L)
    results = []
    for order in ORDERS:
        with thread_order(*order):
            out, grads = case.run(op, BACKEND, torch.float32)
        results.append([out] + grads)
    for other, order in zip(results[1:], ORDERS[1:]):
        for a, b, name in zip(results[0], other, ["out", "dx", "dinit_slots", "dscale", "dslots"]):
            assert torch.equal(bits(a), bits(b)), f"{op} {name} differs between forward and {order} order"


@pytest.mark.parametrize("L,C", [(150, 24), (20, 300)], ids=["C24", "C300"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_tensor_core_kernels_are_bitwise_identical_in_every_thread_order(op, dtype, L, C):
    """The same for 16-bit x, which runs the tensor-core kernels (mma_kernels.cuh): two slot tiles,
    three pixel tiles; and the wide forwards (C > 256: two channel blocks, one pixel tile)."""
    case = Case(1, L, C, 70, "nchw", seed=3)
    results = []
    for order in ORDERS:
        with thread_order(*order):
            out, grads = case.run(op, BACKEND, dtype)
        results.append([out] + grads)
    for other, order in zip(results[1:], ORDERS[1:]):
        for a, b, name in zip(results[0], other, ["out", "dx", "dinit_slots", "dscale", "dslots"]):
            assert torch.equal(bits(a), bits(b)), f"{op} {name} differs between forward and {order} order"


def in_nan_margins(t):
    """t's values in the middle of a NaN buffer, with t's strides."""
    flat = torch.full((t.numel() + 2 * 97,), float("nan"), dtype=t.dtype)
    inner = flat[97 : 97 + t.numel()].view(t.shape)
    inner.copy_(t)
    return inner


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_kernels_read_nothing_outside_their_inputs(op):
    """Inputs inside NaN margins give the same bits as plain ones: no read strays outside."""
    B, L, C, S = 2, 70, 20, 9
    g = torch.Generator().manual_seed(5)
    values = [
        torch.randn(B, L, C, generator=g),
        torch.randn(1, S, C, generator=g),
        torch.randn(B, S, C, generator=g),
        torch.randn((B, S, C) if op == "cluster" else (B, L, C), generator=g),
    ]

    def run(place):
        leaves = [t.clone().requires_grad_() for t in values[:3]]
        x, init, slots = (place(t) for t in leaves)
        if op == "cluster":
            out = glmix_kernels.soft_cluster(x, init, 3.0, backend=BACKEND)
        else:
            out = glmix_kernels.soft_dispatch(x, init, 3.0, slots, backend=BACKEND)
        out.backward(place(values[3]))
        return [out] + [t.grad for t in leaves if t.grad is not None]

    for plain, guarded in zip(run(lambda t: t), run(in_nan_margins)):
        assert torch.isfinite(guarded).all() and torch.equal(plain, guarded)


def test_tensor_core_tests_run_several_chunks():
    """The tensor-core kernels' split of L (plan_mma_chunks) gives one chunk per batch element once
    the batch fills the SMs, but the emulation's single SM still splits the tests' small grids, so
    the partials' combine (cluster_fwd_combine, sum_chunks) stays covered: the thread-order test's
    shape (L = 150 in three 64-pixel tiles, two slot tiles, B = 1) runs two chunks."""
    mma_chunks = torch.ops.glmix_emulated.mma_chunks
    assert list(mma_chunks(150, 64, 2)) == [128, 2]
    assert list(mma_chunks(150, 64, 1)) == [64, 3]
    # glnet_4g stage 3 on an H100's 132 SMs: B = 128 (times the backward's channel chunks) fills them.
    for blocks in (128, 256, 512):
        assert list(mma_chunks(196, 64, blocks, 132)) == [256, 1]
    # Below that, the split of the CUDA-core kernels (plan_chunks): at stage 1's L, chunks of two
    # tiles, neither one chunk nor one per tile.
    assert list(mma_chunks(3136, 64, 16, 132)) == [128, 25]
    # The boundary: a chunk's blocks fill 7/8 of the SMs.
    assert mma_chunks(196, 64, 115, 132)[1] > 1 and mma_chunks(196, 64, 116, 132)[1] == 1


def test_tensor_core_backward_needs_its_shared_memory():
    """use_mma_bwd's choice of kernels: pixel_bwd_mma / slot_bwd_mma at 16-bit C <= 256 and fp32
    C <= 128 where their tiles fit (an H100, the emulated device, always; an A100's 163 KB per block
    not the dispatch's five tiles above 16-bit C = 128 and fp32 C = 64; sm_86's 99 KB neither op's
    above those), else the wide kernels (69 and 86 KB), which fit all three: tensor cores at every C
    of the backend (1 to 1024)."""
    kernels = torch.ops.glmix_emulated.mma_bwd_kernels
    a100, h100, sm86 = 163 * 1024, 227 * 1024, 99 * 1024
    for fp32, widest in [(False, 256), (True, 128)]:
        for dispatch in (False, True):
            narrow_on = {h100: widest, a100: widest // 2 if dispatch else widest, sm86: widest // 2}
            for smem, narrowest in narrow_on.items():
                for C in (1, 16, 64, 65, 128, 129, 256, 257, 512, 1000, 1024):
                    want = "narrow" if C <= narrowest else "wide"
                    assert kernels(C, fp32, dispatch, smem) == want, (C, fp32, dispatch, smem)
    assert kernels(1024, False, True, 48 * 1024) == "cuda_cores"  # below sm_80's shared memory


def test_tensor_core_forward_needs_its_shared_memory():
    """use_mma_fwd's shared-memory test: an A100 (163 KB per block) and an H100 take every C of the
    backend (up to 1024; above 16-bit C = 256 and fp32 C = 128 through the wide kernels' 132 KB) on
    tensor cores; sm_86 / sm_89 (99 KB) only 16-bit C <= 128 and fp32 C <= 64, the rest on CUDA
    cores."""
    fits = torch.ops.glmix_emulated.mma_fwd_fits
    a100, h100, sm86 = 163 * 1024, 227 * 1024, 99 * 1024
    for fp32, widest_on_sm86 in [(False, 128), (True, 64)]:
        for dispatch in (False, True):
            for C in (1, 64, 128, 129, 256, 257, 512, 1024):
                assert fits(C, fp32, dispatch, a100) and fits(C, fp32, dispatch, h100)
                assert fits(C, fp32, dispatch, sm86) == (C <= widest_on_sm86), (C, fp32, dispatch)
