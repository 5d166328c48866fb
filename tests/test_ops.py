"""Every fused backend against the reference: forward, every gradient, dtypes, layouts, poisoned
outputs, determinism, what is saved for backward, custom-op registration and torch.compile.

Parametrised over (backend, device): a new backend is one line in the registry, and a backend or
device missing on this machine skips with the reason.
"""

import zlib

import pytest
import torch

import glmix_kernels
from _helpers import (
    TOL,
    Case,
    OpLog,
    assert_close_normwise,
    backend_params,
    check_against_reference,
    poisoned_and_deterministic,
    require,
)
from glmix_kernels import backends
from glmix_kernels.backends import BACKENDS, contract

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, L, C, S, x layout, broadcast slots, init_slots layout): odd L (no block divides it), S of
# 1, 24 and 64, C from 32 to 1024, every layout of x, broadcast and per-batch slots.
SHAPES = [
    (2, 37, 32, 1, "contiguous", True, "contiguous"),
    (2, 203, 32, 24, "nchw", False, "transposed"),
    (1, 131, 384, 64, "nchw", True, "contiguous"),
    (2, 97, 64, 64, "sliced", False, "contiguous"),
    (1, 45, 1024, 24, "contiguous", False, "transposed"),
    (3, 1, 32, 5, "nchw", True, "contiguous"),  # a single pixel, more slots than pixels
    (2, 29, 1, 3, "sliced", False, "transposed"),  # a single channel: every key is +-1
]


def shape_id(s):
    return "B{}-L{}-C{}-S{}-{}-{}-{}".format(*s[:5], "bcast" if s[5] else "batched", s[6])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_matches_reference(backend, device, op, dtype, shape):
    require(backend, device)
    B, L, C, S, layout, broadcast, slots_layout = shape
    if backend == "triton" and device == "cpu" and C >= 384 and dtype != torch.bfloat16:
        # Minutes each under the interpreter. fp16 takes bf16's tile configs; fp32's C blocks are
        # tested at a narrower C in test_triton.py.
        pytest.skip("the interpreter runs the widest shapes in bf16 only")
    case = Case(
        B,
        L,
        C,
        S,
        layout,
        broadcast,
        slots_layout,
        dtype=dtype,
        device=device,
        seed=zlib.crc32(repr((shape, op, str(dtype))).encode()),
    )  # stable across runs
    check_against_reference(case, op, backend)


# glnet_4g stage 1 and glnet_9g stage 3 at full size (batch cut): only where kernels run natively.
@pytest.mark.parametrize("shape", [(4, 3136, 64, 64), (8, 196, 384, 64)], ids=["4g-stage1", "9g-stage3"])
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params(devices=["cuda"]))
def test_glnet_stage_shapes_on_gpu(backend, device, op, shape):
    require(backend, device)
    B, L, C, S = shape
    check_against_reference(Case(B, L, C, S, "nchw", True, dtype=torch.bfloat16, device=device), op, backend)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_most_slots(backend, device, op):
    """S = 256, the CUDA and Triton limit: several slot tiles whichever tile sizes a backend picks."""
    require(backend, device)
    check_against_reference(Case(2, 19, 8, 256, "nchw", broadcast=True, device=device), op, backend)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_tiny_scale(backend, device, op):
    """A temperature near zero makes the softmaxes uniform."""
    require(backend, device)
    check_against_reference(Case(2, 53, 32, 16, "nchw", scale=1e-4, device=device), op, backend)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_huge_scale(backend, device, op):
    """A temperature of 1e4 makes the softmaxes one-hot: without subtracting the max, exp overflows.

    fp32 logits then carry errors of about 6e-8 * 1e4, and the gradients, scaled by 1e4 again,
    are ill-conditioned in fp32 whoever computes them (an fp32 reference is as far from the fp64
    one): the output is compared at the logits' accuracy, the gradients must be finite and sane.
    """
    require(backend, device)
    case = Case(2, 53, 32, 16, "nchw", scale=1e4, device=device)
    with poisoned_and_deterministic():
        out, grads = case.run(op, backend, torch.float32)
    ref_out, ref_grads = case.expected(op)
    assert_close_normwise(out, ref_out, 2e-3, f"{op} output")
    for g, r in zip(grads, ref_grads):
        assert_close_normwise(g, r, 0.5, f"{op} gradient", floor=1.0)


@pytest.mark.parametrize("backend,device", backend_params())
def test_one_channel_short_pixel(backend, device):
    """C = 1: dispatch's dx is zero in exact arithmetic (every key is +-1, the key path lies along
    it), so dx is what is left of ``dK / r`` after the projection. ``dK``'s terms ``dA qs`` cancel,
    and a short pixel (``r = 1e-4``) amplifies 1 / r whatever rounding the projection does not
    remove: taken from ``dK`` itself, it removes all of ``dK``'s, accumulation included."""
    require(backend, device)
    case = Case(2, 29, 1, 16, "contiguous", scale=7.4, device=device)
    case.x_base[0, 3] = 1e-4
    check_against_reference(case, "dispatch", backend)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_scale_in_the_inputs_dtype(backend, device, op):
    """A half-precision temperature (a model cast with .half()) is accepted and gets its gradient."""
    require(backend, device)
    case = Case(2, 61, 40, 12, "nchw", dtype=torch.float16, device=device)
    case.scale = case.scale.half().float()  # the reference sees the same rounded value
    xb, s0b, _, slots = case.leaves(torch.float16)
    scale = case.scale.to(device, torch.float16).requires_grad_()
    x, s0 = case.view_x(xb), case.view_slots(s0b)
    if op == "cluster":
        out = glmix_kernels.soft_cluster(x, s0, scale, backend=backend)
        out.backward(case.grad_slots.to(device, torch.float16))
    else:
        out = glmix_kernels.soft_dispatch(x, s0, scale, case.view_slots(slots), backend=backend)
        out.backward(case.grad_out.to(device, torch.float16))
    assert scale.grad.dtype == torch.float16
    ref_out, ref_grads = case.expected(op)
    assert_close_normwise(out, ref_out, TOL[torch.float16], f"{op} output")
    assert_close_normwise(scale.grad, ref_grads[2], TOL[torch.float16], f"{op} dscale")


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_short_slots(backend, device, op):
    """Slots of norm 1e-3 beside unit ones: their gradients, amplified by 1 / r through the
    normalisation's backward (dq - q <q, dq>) / r, are as accurate as the others'."""
    require(backend, device)
    case = Case(2, 41, 32, 8, "nchw", broadcast=True, slots_layout="transposed", device=device)
    case.slots0_base[..., ::2] *= 1e-3  # every other slot (the last axis of the transposed base)
    check_against_reference(case, op, backend)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_zero_pixels_use_the_norm_epsilon(backend, device, op):
    require(backend, device)
    case = Case(2, 41, 32, 8, "nchw", device=device)
    case.x_base[:, :, ::5] = 0  # whole pixels of zeros: ||x|| < 1e-12
    check_against_reference(case, op, backend)


# (B, L, C, S) and dtype: the backward paths keys with a common offset go through.
OFFSET_PATHS = [
    # all of S and C in one tile (Triton pixel_bwd, GLNet stage 1), CUDA's tensor cores
    pytest.param((2, 150, 64, 64), torch.bfloat16, id="one-c-block-bf16"),
    pytest.param((2, 150, 64, 64), torch.float16, id="one-c-block-fp16"),
    pytest.param((2, 150, 64, 64), torch.float32, id="one-c-block-fp32"),
    # Triton's slot_bwd over C and S blocks, CUDA's CUDA cores (fp32 past the tensor cores' C)
    pytest.param((1, 77, 130, 40), torch.float32, id="slot-bwd-fp32"),
    # Triton's pixel_bwd, one tile per chunk over C blocks
    pytest.param((1, 40, 136, 5), torch.bfloat16, id="one-tile-bf16"),
    # one pixel tile per batch element: CUDA's fused_bwd_mma on the emulator too (fp16's scaled dqs operands)
    pytest.param((4, 60, 64, 64), torch.float16, id="one-pixel-tile-fp16"),
]


@pytest.mark.parametrize("slots_offset", [False, True], ids=["x-offset", "x-and-slots-offset"])
@pytest.mark.parametrize("scale", [None, 40.0], ids=["default-scale", "scale-40"])
@pytest.mark.parametrize("shape,dtype", OFFSET_PATHS)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_keys_with_a_large_common_offset(backend, device, op, shape, dtype, scale, slots_offset):
    """An offset of 64 on x (as after a norm layer's bias or a ReLU): the keys nearly share one
    direction, and with the slots offset too (pooled from x, as in GLNet) so do the queries.
    Clustering's dqs = dA K carries delta's rounding (through sum_l dA, zero in exact arithmetic)
    times that direction unless centred on the keys' mean (math.md#centred-dqs): before, fp32
    d_init_slots 20x the tolerance (CPU), dscale 92x, 133x with the slots offset. Dispatch's
    dscale = sum_s <dqs_s, q_s> carries the products' rounding times the queries' shared
    direction unless the queries are centred on their mean (math.md#centred-dscale): before, 2.4x
    (Triton, fp32), 3.7x (CUDA, fp16 at scale 40), with the slots offset."""
    require(backend, device)
    case = Case(*shape, "nchw", dtype=dtype, device=device, scale=scale)
    case.x_base += 64.0
    if slots_offset:
        case.slots0_base += 64.0
    check_against_reference(case, op, backend)


@pytest.mark.parametrize(
    "shape,dtype",
    [
        OFFSET_PATHS[0],
        OFFSET_PATHS[3],
        pytest.param((4, 60, 64, 64), torch.bfloat16, id="one-pixel-tile-bf16"),
    ],
)
@pytest.mark.parametrize("backend,device", backend_params())
def test_zero_pixels_among_keys_with_a_common_offset(backend, device, shape, dtype):
    """Zero pixels (K = 0) among keys offset by 64: their dA still counts in the sum_l dA = 0 that
    the centred dqs relies on, so the kernels' sums of dA must take them (a sum over the live
    pixels alone is off by theirs, times the keys' mean). Not fp16: a zero pixel's dx,
    dK / 1e-12, overflows it."""
    require(backend, device)
    case = Case(*shape, "nchw", dtype=dtype, device=device)
    case.x_base += 64.0
    case.x_base[:, :, ::7] = 0
    check_against_reference(case, "cluster", backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_inference_mode(backend, device):
    case = Case(2, 77, 48, 24, "nchw", broadcast=True, device=device)
    require(backend, device)
    x, s0 = case.view_x(case.x_base.float()), case.view_slots(case.slots0_base.float())
    x, s0, slots = x.to(device), s0.to(device), case.slots.float().to(device)
    with torch.inference_mode():
        got = [
            glmix_kernels.soft_cluster(x, s0, case.scale, backend=backend),
            glmix_kernels.soft_dispatch(x, s0, case.scale, slots, backend=backend),
        ]
    want = [
        glmix_kernels.reference.soft_cluster(x, s0, case.scale),
        glmix_kernels.reference.soft_dispatch(x, s0, case.scale, slots),
    ]
    for g, w in zip(got, want):
        assert_close_normwise(g, w, TOL[torch.float32], "inference mode")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_autocast_matches_reference(backend, device, op, dtype):
    """fp32 inputs under autocast run the fused op in the autocast dtype, gradients back in fp32."""
    require(backend, device)
    case = Case(2, 77, 48, 24, "nchw", broadcast=True, dtype=dtype, device=device)
    with torch.autocast(device, dtype=dtype):
        out, grads = case.run(op, backend, torch.float32)
    assert out.dtype == dtype and all(g.dtype == torch.float32 for g in grads)
    ref_out, ref_grads = case.expected(op)
    for g, w in zip([out] + grads, [ref_out] + ref_grads):
        assert_close_normwise(g, w, TOL[dtype], "autocast")


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_backward_is_bitwise_deterministic(backend, device, op):
    require(backend, device)
    case = Case(2, 157, 48, 24, "nchw", device=device)
    with poisoned_and_deterministic():
        first = case.run(op, backend, torch.float32)
        second = case.run(op, backend, torch.float32)
    for a, b in zip([first[0]] + first[1], [second[0]] + second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_default_mode_matches_reference(backend, device, op):
    """Outside deterministic mode too: a backend may pick other paths or configs on that flag."""
    require(backend, device)
    case = Case(2, 157, 48, 24, "nchw", device=device)
    out, grads = case.run(op, backend, torch.float32)
    ref_out, ref_grads = case.expected(op)
    for a, b in zip([out] + grads, [ref_out] + ref_grads):
        assert_close_normwise(a, b, TOL[torch.float32], op)


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_saves_nothing_of_size_slots_by_pixels(backend, device, op):
    require(backend, device)
    B, L, C, S = 2, 300, 16, 64  # chosen so x, slots and outputs are all smaller than B*S*L
    case = Case(B, L, C, S, "nchw", device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        case.run(op, backend, torch.float32)
    assert saved and max(saved) < B * S * L, f"saved numels {sorted(saved)} (B*S*L = {B * S * L})"


@pytest.mark.parametrize("B,L,C,S", [(2, 7, 5, 3), (1, 7, 3, 1), (3, 3, 2, 5)])
@pytest.mark.parametrize("broadcast", [True, False], ids=["bcast", "batched"])
@pytest.mark.parametrize("slots_layout", ["contiguous", "transposed"])  # transposed: pooled slots
@pytest.mark.parametrize("backend", [n for n in BACKENDS if torch.float64 in BACKENDS[n].dtypes])
def test_gradcheck_fp64(backend, slots_layout, broadcast, B, L, C, S):
    require(backend, "cpu")
    case = Case(B, L, C, S, "nchw", broadcast=broadcast, slots_layout=slots_layout, seed=B * 100 + L)
    xb, s0b, scale, slots = case.leaves(torch.float64)

    def both(xb, s0b, scale, slots):
        x, s0, slots = case.view_x(xb), case.view_slots(s0b), case.view_slots(slots)
        return (
            glmix_kernels.soft_cluster(x, s0, scale, backend=backend),
            glmix_kernels.soft_dispatch(x, s0, scale, slots, backend=backend),
        )

    assert torch.autograd.gradcheck(both, (xb, s0b, scale, slots))


def op_calls(kernels, dtype, device, broadcast):
    """Arguments of each of the four ops, by name: NCHW-strided x, transposed init_slots."""
    B, L, C, S = 2, 33, 16, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, L, generator=g).to(device, dtype).transpose(1, 2)
    init_slots = torch.randn(1 if broadcast else B, C, S, generator=g).to(device, dtype).transpose(1, 2)
    scale = torch.tensor(3.0, device=device)
    slots = torch.randn(B, S, C, generator=g).to(device, dtype)
    c_slots, c_lse = kernels.cluster_fwd(x, init_slots, scale)
    out, d_lse = kernels.dispatch_fwd(x, init_slots, scale, slots)
    c_grad, d_grad = (torch.randn(t.shape, generator=g).to(device, dtype) for t in (c_slots, out))
    return {
        "cluster_fwd": (x, init_slots, scale),
        "cluster_bwd": (c_grad, x, init_slots, scale, c_slots, c_lse),
        "dispatch_fwd": (x, init_slots, scale, slots),
        "dispatch_bwd": (d_grad, x, init_slots, scale, slots, d_lse),
    }


@pytest.mark.parametrize("broadcast", [True, False], ids=["bcast", "batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_kernels_pass_opcheck(backend, device, dtype, broadcast):
    require(backend, device)
    if dtype not in BACKENDS[backend].dtypes:
        pytest.skip(f"backend {backend!r} does not take {dtype}")
    kernels = backends.kernels(backend)
    for name, args in op_calls(kernels, dtype, device, broadcast).items():
        torch.library.opcheck(getattr(kernels, name), args)


@pytest.mark.parametrize("backend,device", backend_params())
def test_kernel_outputs_follow_the_contract(backend, device):
    """Shapes, dtypes and contiguity of every op's outputs are those contract.py allocates."""
    require(backend, device)
    kernels = backends.kernels(backend)
    for name, args in op_calls(kernels, torch.float16, device, broadcast=True).items():
        got = getattr(kernels, name)(*args)
        want = getattr(contract, f"{name}_outputs")(*args)
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert (g.shape, g.dtype, g.is_contiguous()) == (w.shape, w.dtype, True), name


def dispatched_ops(op, backend, device):
    """The operators dispatched by one forward and (separately) one backward of ``op``."""
    case = Case(2, 37, 16, 8, "nchw", broadcast=True, slots_layout="transposed", device=device)
    xb, s0b, scale, slots = case.leaves(torch.float32)
    x, s0, slots_view = case.view_x(xb), case.view_slots(s0b), case.view_slots(slots)
    with OpLog() as fwd:
        if op == "cluster":
            out = glmix_kernels.soft_cluster(x, s0, scale, backend=backend)
        else:
            out = glmix_kernels.soft_dispatch(x, s0, scale, slots_view, backend=backend)
    grad = torch.randn(out.shape, device=device)
    inputs = [x, s0, scale] + ([] if op == "cluster" else [slots_view])
    with OpLog() as bwd:
        torch.autograd.grad(out, inputs, grad)
    return fwd.ops, bwd.ops


@pytest.mark.parametrize("backend,device", backend_params())
def test_one_op_call_per_direction(backend, device):
    """Counted: each direction dispatches its kernel op and nothing else, but for clustering's
    output, rounded from the accumulation-precision slots it saves (one copy). An elementwise
    chain around the kernels (normalising the slots in Python, say) adds operators here."""
    require(backend, device)
    ns = {"triton": "glmix_triton", "cuda_emulated": "glmix_emulated"}.get(backend, "glmix_kernels")
    assert dispatched_ops("cluster", backend, device) == ([f"{ns}.cluster_fwd", "aten._to_copy"], [f"{ns}.cluster_bwd"])
    assert dispatched_ops("dispatch", backend, device) == ([f"{ns}.dispatch_fwd"], [f"{ns}.dispatch_bwd"])


@pytest.mark.parametrize("backend,device", backend_params())
def test_compiles_fullgraph_and_matches_eager(backend, device):
    require(backend, device)
    case = Case(2, 45, 32, 8, "nchw", broadcast=True, device=device)

    def block(xb, s0b, scale, slots):
        x, s0 = case.view_x(xb), case.view_slots(s0b)
        mixed = glmix_kernels.soft_cluster(x, s0, scale, backend=backend) + slots
        return glmix_kernels.soft_dispatch(x, s0, scale, mixed, backend=backend)

    # aot_eager traces through the custom ops' fake kernels; inductor needs a GPU for Triton.
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for fn in (block, compiled):
        leaves = case.leaves(torch.float32)
        out = fn(*leaves)
        out.backward(case.grad_out.to(device, torch.float32))
        results.append([out] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
