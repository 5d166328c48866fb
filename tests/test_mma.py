"""The tensor-core fragment functions of csrc/cuda/mma.cuh, run on the CPU under the emulation.

A one-warp test kernel (csrc/tests/mma_test_kernels.cuh) multiplies a 16x16 by a 16x8 tile through
the fragment loads and products and records every lane's fragment registers; a small host runner
(csrc/tests/mma_harness.cpp: 32 threads, shuffles through an exchange array) executes it. The
layouts are checked against the PTX ISA's formulas, written out again here, and the products
against torch.matmul. The GPU build of the same functions (ldmatrix, mma.sync) is compiled by
scripts/cuda_compile_check.sh; its ldmatrix addressing is checked here against a model of the
instruction, and only a GPU run can check the rest.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from _helpers import Case, check_against_reference, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "c++")
DT16 = {"bf16": torch.bfloat16, "f16": torch.float16}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX})")
    exe = str(tmp_path_factory.mktemp("mma") / "mma_harness")
    r = subprocess.run(
        [
            CXX,
            "-std=c++20",
            "-O1",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-o",
            exe,
            os.path.join(ROOT, "csrc", "tests", "mma_harness.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"building the mma harness failed:\n{r.stderr[-4000:]}"

    def run(kind, *arrays, orders=(0,)):
        """The runner's output; with several thread orders, checks they agree bit for bit (a race
        between barriers shows as a difference)."""
        data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        outs = []
        for order in orders:
            p = subprocess.run(
                [exe, kind],
                input=data,
                capture_output=True,
                timeout=300,
                env=dict(os.environ, MMA_HARNESS_ORDER=str(order)),
            )
            assert p.returncode == 0, p.stderr.decode()[-2000:]
            outs.append(p.stdout)
        assert all(o == outs[0] for o in outs), f"{kind}: the result depends on the thread order (a race)"
        return outs[0]

    return run


def split(buf, *parts):
    """Cut the runner's output into arrays of (dtype, count)."""
    out, off = [], 0
    for dtype, n in parts:
        a = np.frombuffer(buf, dtype=dtype, count=n, offset=off).copy()
        out.append(a)
        off += a.nbytes
    assert off == len(buf), f"runner wrote {len(buf)} bytes, expected {off}"
    return out


# The PTX ISA's fragment layouts (groupID g = lane >> 2, threadID_in_group t = lane % 4), for
# mma.m16n8k16 with .f16/.bf16 and mma.m16n8k8 with .tf32: (row, col) of element i.
def a16(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i in (0, 1, 4, 5) else g + 8), t * 2 + (i & 1) + (8 if i >= 4 else 0)


def b16(lane, i):
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def c_rc(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def a_tf32(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i in (0, 2) else g + 8), (t if i < 2 else t + 4)


def b_tf32(lane, i):
    g, t = lane >> 2, lane % 4
    return (t if i == 0 else t + 4), g


def bits16(t):
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def halves(word):
    return [int(word) & 0xFFFF, int(word) >> 16]


def tf32_rna(x):
    """Round fp32 to tf32, nearest with ties away from zero (cvt.rna), as bit patterns."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x1000) & 0xFFFFE000).astype(np.uint32)


def normwise(actual, expected):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_fragment_layout_16bit(harness, kind):
    """Element (r, c) holds the value 16 r + c (exact in both types): every lane's registers must
    hold exactly the elements the PTX ISA assigns it, through ldmatrix-style "n" and "t" loads."""
    dt = DT16[kind]
    idx = torch.arange(256, dtype=torch.float32).reshape(16, 16)
    out = harness(kind, bits16(idx.to(dt)), bits16(idx.to(dt)), bits16(idx[:, :8].to(dt)), np.zeros(128, np.float32))
    *_, frag = split(out, (np.float32, 128), (np.float32, 128), (np.float32, 128), (np.uint32, 32 * 12))
    frag = frag.reshape(32, 12)
    value = {bits16(torch.tensor(float(v)).to(dt)).item(): v for v in range(256)}
    for lane in range(32):
        for base in (0, 6):  # "n" loads, then "t" loads
            a = [value[h] for w in frag[lane, base : base + 4] for h in halves(w)]
            b = [value[h] for w in frag[lane, base + 4 : base + 6] for h in halves(w)]
            assert a == [16 * r + c for r, c in (a16(lane, i) for i in range(8))], (lane, base, "A")
            # B[k][n] = 16 k + n
            assert b == [16 * k + n for k, n in (b16(lane, i) for i in range(4))], (lane, base, "B")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_tile_product_16bit(harness, kind, seed):
    """D = A B + C for both load orders, and the accumulators fed back as an A operand, against
    torch.matmul on the same rounded operands. The 16-bit products are exact in fp32; only the
    fp32 sums round, so the bound is a few fp32 ulps, far below any layout error."""
    dt = DT16[kind]
    g = torch.Generator().manual_seed(seed)
    a, b, b3 = (torch.randn(*s, generator=g).to(dt) for s in ((16, 16), (16, 16), (16, 8)))
    c = torch.randn(16, 8, generator=g)
    out = harness(kind, bits16(a), bits16(b), bits16(b3), c.numpy())
    d_n, d_t, d_chain, _ = split(out, (np.float32, 128), (np.float32, 128), (np.float32, 128), (np.uint32, 32 * 12))
    expected = a.double() @ b[:, :8].double() + c.double()
    assert normwise(d_n.reshape(16, 8), expected) < 1e-6
    assert normwise(d_t.reshape(16, 8), expected) < 1e-6
    p = torch.matmul(a.float(), b.float()).to(dt)  # the intermediate rounds to the operand type
    chained = p.double() @ b3.double()
    # An fp32 sum that lands on the other side of a rounding boundary moves one element of p by an
    # ulp of dt: allow two ulps normwise.
    assert normwise(d_chain.reshape(16, 8), chained) < 2 * torch.finfo(dt).eps


@pytest.mark.parametrize("seed", [0, 1])
def test_tile_product_3xtf32(harness, seed):
    """fp32 on tensor cores through the hi/lo split keeps fp32 accuracy (well inside the suite's
    5e-5), where a single TF32 product does not: the split is what makes fp32 pass."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    out = harness("f32", a.numpy(), b.numpy(), c.numpy())
    d_n, d_t, d_1x, frag = split(out, (np.float32, 128), (np.float32, 128), (np.float32, 128), (np.uint32, 32 * 6))
    expected = a.double() @ b.double() + c.double()
    assert normwise(d_n.reshape(16, 8), expected) < 2e-6
    assert normwise(d_t.reshape(16, 8), expected) < 2e-6
    assert normwise(d_1x.reshape(16, 8), expected) > 5e-5  # one TF32 pass: outside the fp32 tolerance
    # Layout of the tf32 fragments (first k step): the hi parts are cvt.rna of the documented elements.
    frag = frag.reshape(32, 6)
    a_bits, b_bits = tf32_rna(a.numpy()), tf32_rna(b.numpy())
    for lane in range(32):
        assert list(frag[lane, :4]) == [a_bits[r, c] for r, c in (a_tf32(lane, i) for i in range(4))], lane
        assert list(frag[lane, 4:]) == [b_bits[k, n] for k, n in (b_tf32(lane, i) for i in range(2))], lane


def ldmatrix(addr, nmat, trans):
    """The PTX ISA's ldmatrix .m8n8 .b16: lanes 8 j .. 8 j + 7 give the row addresses of matrix j;
    lane l receives in register j the elements (l / 4, 2 (l % 4) + h) of that matrix, h = 0, 1,
    or (2 (l % 4) + h, l / 4) with .trans. Returns [lane][j][h] = (row, col) in the stored tile."""

    def elem(j, r, c):
        row, col = addr[8 * j + r]
        return row, col + c

    return [
        [
            [elem(j, l % 4 * 2 + h, l // 4) if trans else elem(j, l // 4, l % 4 * 2 + h) for h in (0, 1)]
            for j in range(nmat)
        ]
        for l in range(32)
    ]


def test_gpu_loads_match_the_documented_layout(harness):
    """The GPU build loads fragments with ldmatrix from row addresses the lanes compute
    (ldsm_a_row, ldsm_b_row); what ldmatrix then hands each lane must be the mma layout. Checked
    through a model of ldmatrix, since no GPU runs here."""
    out = np.frombuffer(harness("ldsm"), dtype=np.int32).reshape(4, 32, 2)
    addr = {name: [tuple(map(int, rc)) for rc in out[i]] for i, name in enumerate(["a_n", "a_t", "b_n", "b_t"])}
    for name, nmat, trans in [("a_n", 4, False), ("a_t", 4, True), ("b_n", 2, False), ("b_t", 2, True)]:
        got = ldmatrix(addr[name], nmat, trans)
        for lane in range(32):
            for j in range(nmat):
                for h in (0, 1):
                    row, col = got[lane][j][h]
                    i = 2 * j + h
                    # stored order: A "n" [m][k], A "t" [k][m], B "n" [n][k], B "t" [k][n]
                    want = {
                        "a_n": a16(lane, i),
                        "a_t": a16(lane, i)[::-1],
                        "b_n": b16(lane, i)[::-1],
                        "b_t": b16(lane, i),
                    }[name]
                    assert (row, col) == want, (name, lane, j, h)


def test_accumulator_layout_is_the_documented_one():
    """The runner's C loads/stores go through c_rc; the products above pass only if it is right.
    This pins the Python copy of the formula the tests use for C to the PTX ISA's table."""
    assert [c_rc(5, i) for i in range(4)] == [(1, 2), (1, 3), (9, 2), (9, 3)]
    assert [a16(5, i) for i in range(8)] == [(1, 2), (1, 3), (9, 2), (9, 3), (1, 10), (1, 11), (9, 10), (9, 11)]
    assert [b16(5, i) for i in range(4)] == [(2, 1), (3, 1), (10, 1), (11, 1)]


def test_conversions(harness):
    """The emulation's fp32 -> bf16/fp16 (round to nearest even) and fp16 -> fp32 conversions agree
    bit for bit with torch, on every fp16 pattern and on random and edge-case floats."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -1e6,
            6.1e-5,
            6.0e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            1e-10,
            float("inf"),
            -float("inf"),
            3.4e38,
            1.17e-38,
            1e-40,
        ]
    )
    v = torch.cat([special, torch.randn(4000, generator=g) * torch.logspace(-9, 6, 4000).float()])
    one = 0x3F800000 + torch.arange(0, 1 << 23, 1 << 13, dtype=torch.int64)  # floats in [1, 2)
    ties = torch.cat([one + 0x8000, one + 0x1000]).to(torch.int32)  # bf16, fp16 halfway
    v = torch.cat([v, ties.view(torch.float32), -ties.view(torch.float32)])
    n = v.numel()
    out = harness("convert", np.array([n], np.uint32), v.numpy())
    bf, hf, tf, from16 = split(out, (np.uint16, n), (np.uint16, n), (np.uint32, n), (np.float32, 65536))
    np.testing.assert_array_equal(bf, bits16(v.to(torch.bfloat16)))
    np.testing.assert_array_equal(hf, bits16(v.to(torch.float16)))
    np.testing.assert_array_equal(tf, tf32_rna(v.numpy()))
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float().numpy()
    nan = np.isnan(every)
    np.testing.assert_array_equal(from16[~nan].view(np.uint32), every[~nan].view(np.uint32))
    assert np.isnan(from16[nan]).all()


def orders_for(C):
    """The thread orders a forward kernel runs in: random and one warp far ahead (either end); the
    wide kernels (C > 256, twice the work) only the latter two, which catch each of their barriers
    removed."""
    return (3, 4) if C > 256 else (2, 3, 4)


def pixels16(B, L, C, dt, layout, g):
    """Random x (B, L, C) in a 16-bit type, contiguous or the NCHW view."""
    if layout == "contiguous":
        return torch.randn(B, L, C, generator=g).to(dt)
    return torch.randn(B, C, L, generator=g).to(dt).transpose(1, 2)


def stored16(x, layout):
    """x's storage as the runner takes it, and x's strides into it."""
    if layout == "contiguous":
        return x.contiguous(), x.stride()
    B, L, C = x.shape
    return x.transpose(1, 2).contiguous(), (C * L, 1, L)


def cluster_partials_reference(x, qs, chunk_len):
    """Per chunk of pixels: running max m, sum l and acc = exp(A - m) x of each slot (float64)."""
    B, L, C = x.shape
    k = torch.nn.functional.normalize(x, dim=-1)
    out = []
    for l0 in range(0, L, chunk_len):
        a = qs @ k[:, l0 : l0 + chunk_len].transpose(1, 2)
        m = a.amax(-1)
        e = torch.exp(a - m[..., None])
        out.append((m, e.sum(-1), e @ x[:, l0 : l0 + chunk_len]))
    return [torch.stack(t, 1) for t in zip(*out)]  # (B, nchunks, S[, C])


def combine_partials(m, lsum, acc):
    """The slots from per-chunk (max, sum, accumulator) partials (B, nchunks, S[, C])."""
    w = torch.exp(m - m.amax(1, keepdim=True))
    return (w[..., None] * acc).sum(1) / (w * lsum).sum(1)[..., None]


@pytest.mark.parametrize(
    "kind,B,L,C,S,chunk_len,layout",
    [
        ("bf16", 2, 70, 40, 20, 64, "contiguous"),  # tails in pixels, channels and slots; two chunks
        ("f16", 1, 150, 16, 70, 128, "nchw"),  # two slot tiles, two pixel tiles per chunk, NCHW strides
        ("bf16", 1, 20, 200, 9, 64, "contiguous"),  # the widest channel padding, 256
        ("f16", 1, 20, 300, 9, 64, "nchw"),  # the wide kernel: two channel blocks (a block of the grid each)
    ],
)
def test_cluster_fwd_chunk_mma(harness, kind, B, L, C, S, chunk_len, layout):
    """The tensor-core clustering forward's per-chunk partials against float64 torch: the running
    max (fp32 logits: qs split hi/lo), and the slots they combine to (P and x in the 16-bit type).
    With one chunk, lse and the slots it writes instead."""
    dt = DT16[kind]
    g = torch.Generator().manual_seed(0)
    x = pixels16(B, L, C, dt, layout, g)
    qs = 6.0 * torch.nn.functional.normalize(torch.randn(B, S, C, generator=g, dtype=torch.float64), dim=-1).float()
    storage, strides = stored16(x, layout)
    head = np.array([B, L, C, S, chunk_len, *strides, storage.numel()], np.int64)
    nch = -(-L // chunk_len)
    out = harness(f"cluster_fwd_{kind}", head, bits16(storage), qs.contiguous().numpy(), orders=orders_for(C))
    m, lsum, acc = split(out, (np.float32, B * nch * S), (np.float32, B * nch * S), (np.float32, B * nch * S * C))
    m, lsum = torch.from_numpy(m).view(B, nch, S), torch.from_numpy(lsum).view(B, nch, S)
    acc = torch.from_numpy(acc).view(B, nch, S, C)
    rm, rl, racc = cluster_partials_reference(x.double(), qs.double(), chunk_len)
    ref = combine_partials(rm, rl, racc)
    if nch == 1:  # one chunk: the kernel writes lse and the slots themselves (store_chunk)
        rm, slots = rm + rl.log(), acc.double()[:, 0]
    else:
        slots = combine_partials(m.double(), lsum.double(), acc.double())
    tol = {"bf16": 2.5e-2, "f16": 4e-3}[kind]  # the suite's tolerances for these dtypes
    assert (m.double() - rm).abs().max() < 1e-5 * rm.abs().max()  # logits at fp32 accuracy
    assert normwise(slots, ref) < tol
    if nch > 1:
        assert normwise(lsum.double(), rl) < tol


@pytest.mark.parametrize(
    "kind,B,L,C,S,tiles_per_block,layout",
    [
        ("bf16", 2, 150, 40, 20, 2, "nchw"),  # tails in pixels, channels and slots; two tiles in a block
        ("f16", 1, 70, 16, 70, 1, "contiguous"),  # two slot tiles (online softmax across them)
        ("f16", 1, 20, 200, 9, 1, "nchw"),  # the widest channel padding, 256
        ("bf16", 1, 20, 300, 9, 1, "contiguous"),  # the wide kernel: two channel blocks, logits kept
    ],
)
def test_dispatch_fwd_mma(harness, kind, B, L, C, S, tiles_per_block, layout):
    """The tensor-core dispatch forward against float64 torch: out = softmax_S(A)^T slots (rounded
    to the 16-bit type) within the suite's tolerance, lse at fp32 accuracy."""
    dt = DT16[kind]
    g = torch.Generator().manual_seed(1)
    x = pixels16(B, L, C, dt, layout, g)
    qs = 6.0 * torch.nn.functional.normalize(torch.randn(B, S, C, generator=g, dtype=torch.float64), dim=-1).float()
    sl = torch.randn(B, S, C, generator=g).to(dt)
    storage, strides = stored16(x, layout)
    head = np.array([B, L, C, S, tiles_per_block, *strides, storage.numel()], np.int64)
    out = harness(
        f"dispatch_fwd_{kind}", head, bits16(storage), qs.contiguous().numpy(), bits16(sl), orders=orders_for(C)
    )
    o, lse = split(out, (np.uint16, B * L * C), (np.float32, B * L))
    o = torch.from_numpy(o.view(np.int16)).view(dt).view(B, L, C)
    a = qs.double() @ torch.nn.functional.normalize(x.double(), dim=-1).transpose(1, 2)  # (B, S, L)
    ref = torch.softmax(a, 1).transpose(1, 2) @ sl.double()
    assert normwise(o, ref) < {"bf16": 2.5e-2, "f16": 4e-3}[kind]
    ref_lse = torch.logsumexp(a, 1)
    assert (torch.from_numpy(lse).view(B, L).double() - ref_lse).abs().max() < 1e-5 * ref_lse.abs().max()


def backward_reference(op, x, qs, other, upstream):
    """The float64 forward's statistics (lse, the clustering's delta) and the gradients of x, qs and
    (dispatch) the slots, other: the dispatch's slots (the clustering: unused)."""
    x, qs, other = (t.double().requires_grad_() for t in (x, qs, other))
    a = qs @ torch.nn.functional.normalize(x, dim=-1).transpose(1, 2)  # (B, S, L)
    if op == "cluster":
        out, lse = torch.softmax(a, 2) @ x, torch.logsumexp(a, 2)
    else:
        out, lse = torch.softmax(a, 1).transpose(1, 2) @ other, torch.logsumexp(a, 1)
    grads = torch.autograd.grad(out, (x, qs, other), upstream.double(), allow_unused=True)
    delta = (upstream.double() * out).sum(-1)  # the clustering's (B, S)
    return lse.detach(), delta.detach(), grads


@pytest.mark.parametrize(
    "op,kind,B,L,C,S",
    [
        ("cluster", "bf16", 1, 70, 300, 70),  # three channel blocks with a tail, two slot tiles, two chunks
        ("cluster", "f16", 1, 20, 300, 9),  # one slot tile (the logits kept for every chunk)
        ("dispatch", "f16", 1, 70, 300, 70),  # two slot tiles: delta' in a first pass
        ("dispatch", "bf16", 1, 20, 300, 9),
    ],
)
def test_bwd_wide_mma(harness, op, kind, B, L, C, S):
    """pixel_bwd_wide_mma and slot_bwd_wide_mma against float64 autograd (the statistics from the
    float64 forward), within the suite's tolerances, bitwise alike with either warp far ahead
    (every barrier of theirs removed in turn makes this fail), NCHW x, chunks of 64 pixels."""
    dt, chunk_len = DT16[kind], 64
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, C, L, generator=g).to(dt).transpose(1, 2)
    qs = 6.0 * torch.nn.functional.normalize(torch.randn(B, S, C, generator=g, dtype=torch.float64), dim=-1).float()
    sl = torch.randn(B, S, C, generator=g).to(dt)
    up = torch.randn(B, S if op == "cluster" else L, C, generator=g).to(dt)
    lse, delta, (dx_ref, dq_ref, dv_ref) = backward_reference(op, x, qs, sl, up)
    head = np.array([B, L, C, S, chunk_len, C * L, 1, L, B * C * L], np.int64)
    arrays = [head, bits16(x.transpose(1, 2).contiguous()), qs.contiguous().numpy(), bits16(up)]
    if op == "cluster":
        arrays += [lse.float().numpy(), delta.float().numpy()]
    else:
        arrays += [bits16(sl), lse.float().numpy()]
    out = harness(f"{op}_bwd_wide_{kind}", *arrays, orders=(3, 4))
    nch, n = -(-L // chunk_len), B * S * C
    n_dv = nch * n if op == "dispatch" else 0
    dx, dq, dv = split(out, (np.uint16, B * L * C), (np.float32, nch * n), (np.float32, n_dv))
    dx = torch.from_numpy(dx.view(np.int16)).view(dt).view(B, L, C)
    tol = {"bf16": 2.5e-2, "f16": 4e-3}[kind]  # the suite's tolerances for these dtypes
    assert normwise(dx, dx_ref) < tol
    assert normwise(torch.from_numpy(dq).view(B, nch, S, C).sum(1), dq_ref) < tol
    if op == "dispatch":
        assert normwise(torch.from_numpy(dv).view(B, nch, S, C).sum(1), dv_ref) < tol


@pytest.mark.parametrize(
    "kind,op,B,L,C,S,layout",
    [
        ("bf16", "cluster", 2, 150, 40, 20, "nchw"),  # tails in pixels, channels and slots; three tiles
        ("f16", "cluster", 1, 70, 64, 64, "contiguous"),  # all 64 slots and channels
        ("bf16", "dispatch", 2, 70, 24, 9, "contiguous"),
        ("f16", "dispatch", 1, 150, 64, 64, "nchw"),
    ],
)
def test_fused_bwd_mma(harness, kind, op, B, L, C, S, layout):
    """The fused backward (fused_bwd_mma: dx and the slot-side sums in one kernel, dA exchanged
    through shared memory) against float64 autograd within the suite's tolerances, bitwise equal
    in a random thread order and with a warp far ahead of the others (either end)."""
    dt = DT16[kind]
    g = torch.Generator().manual_seed(2)
    x = pixels16(B, L, C, dt, layout, g)
    if kind == "bf16":  # zero pixels: the norm epsilon's branch (in fp16 their dx, dK / 1e-12, overflows)
        x[:, ::13] = 0
    qs = 6.0 * torch.nn.functional.normalize(torch.randn(B, S, C, generator=g, dtype=torch.float64), dim=-1).float()
    grad = torch.randn(B, L if op == "dispatch" else S, C, generator=g).to(dt)
    slots = torch.randn(B, S, C, generator=g).to(dt) if op == "dispatch" else None
    lse, delta, ref = backward_reference(op, x, qs, qs if slots is None else slots, grad)
    stats = [lse.float().contiguous().numpy()] + ([delta.float().contiguous().numpy()] if op == "cluster" else [])
    storage, strides = stored16(x, layout)
    head = np.array([B, L, C, S, *strides, storage.numel()], np.int64)
    inputs = [head, bits16(storage), qs.contiguous().numpy(), bits16(grad)]
    inputs += [bits16(slots)] if op == "dispatch" else []
    out = harness(f"{op}_bwd_{kind}", *inputs, *stats, orders=(2, 3, 4))
    parts = [(np.uint16, B * L * C), (np.float32, B * S * C)] + ([(np.uint16, B * S * C)] if op == "dispatch" else [])
    got = split(out, *parts)
    tol = {"bf16": 2.5e-2, "f16": 4e-3}[kind]  # the suite's tolerances for these dtypes
    dx = torch.from_numpy(got[0].view(np.int16)).view(dt).view(B, L, C)
    assert normwise(dx, ref[0]) < tol
    assert normwise(torch.from_numpy(got[1]).view(B, S, C), ref[1]) < tol
    if op == "dispatch":
        assert normwise(torch.from_numpy(got[2].view(np.int16)).view(dt).view(B, S, C), ref[2]) < tol


# ---------------------------------------------------------------- the tensor-core kernels, through the ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize(
    "B,L,C,S,layout,slots_layout",
    [
        (1, 150, 40, 70, "nchw", "transposed"),  # two slot tiles, three pixel tiles, tails in all three
        (2, 67, 24, 9, "sliced", "contiguous"),  # one channel chunk; strided channels
        (1, 67, 72, 70, "nchw", "contiguous"),  # backward channel chunks (1-2, fp32 2-4), two slot tiles
        (1, 20, 136, 9, "sliced", "transposed"),  # 2-4 channel chunks at C padded to 256 (fp32: wide forward)
        # The wide kernels: the forwards 2 channel blocks (fp32 3) with a tail, the backwards 3 (fp32
        # 5), and two slot tiles (logits recomputed per output block or chunk; the dispatch's delta'
        # in a first pass); 3 blocks (fp32 5; backward 5 and 9) and one slot tile (logits kept for
        # every output block or chunk), past glnet stage 4's C = 512; 4 (fp32 8; backward 8 and 16)
        # near the backend's 1024.
        (1, 20, 300, 70, "nchw", "contiguous"),
        (2, 9, 520, 9, "sliced", "transposed"),
        (1, 5, 1000, 7, "nchw", "contiguous"),
        # Two pixel tiles per block of the wide pixel side (5 tiles, B = 2 on the emulated SM).
        (2, 260, 300, 9, "nchw", "contiguous"),
    ],
)
def test_mma_kernels_through_the_ops(op, dtype, B, L, C, S, layout, slots_layout):
    """The tensor-core kernels as the cuda_emulated ops launch them (forward: fp16/bf16 C <= 256,
    fp32 C <= 128 by 3xTF32, wider C by the wide forwards' channel blocks; backward pixel_bwd_mma,
    slot_bwd_mma: fp16/bf16 C <= 256, fp32 C <= 128, in chunks of 64 or 128 channels, fp32 32 or
    64, wider C by their wide kernels' channel blocks, as the selection op shows) against the
    float64 reference within the suite's tolerances; with zero pixels (the norm epsilon's branch)
    except in fp16, where their dx, dK / 1e-12, overflows."""
    require("cuda_emulated", "cpu")
    fp32, widest = dtype == torch.float32, 128 if dtype == torch.float32 else 256
    want = "wide" if C > widest else "narrow"
    assert torch.ops.glmix_emulated.mma_bwd_kernels(C, fp32, op == "dispatch", 227 * 1024) == want
    case = Case(B, L, C, S, layout, slots_layout=slots_layout, dtype=dtype, seed=L)
    if dtype != torch.float16:
        case.view_x(case.x_base)[:, ::11] = 0  # whole pixels
    check_against_reference(case, op, "cuda_emulated")


# (B, L, C, S, chunks): the clustering forward's split of L on the emulated device (one SM): one
# chunk per batch element once a chunk's grid has four blocks, whose kernel then writes slots and
# lse itself (store_chunk), else two chunks of partials and cluster_fwd_combine; narrow C (two
# pixel tiles, a slot tail) and the wide forward (two channel blocks, fp32 three, with a tail).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B,L,C,S,chunks",
    [(2, 100, 40, 70, 1), (1, 100, 40, 70, 2), (1, 80, 300, 70, 1), (1, 80, 300, 9, 2)],
)
def test_cluster_forward_with_one_chunk_and_with_several(dtype, B, L, C, S, chunks):
    """Forward and every gradient against the reference on both paths of cluster_fwd; the plan op
    (plan_mma_chunks, with the grid cluster_fwd launches) shows which path the case takes."""
    require("cuda_emulated", "cpu")
    wide = 128 if dtype == torch.float32 else 256  # kMmaTf32MaxChannels, kMmaMaxChannels
    channel_blocks = -(-C // wide) if C > wide else 1
    blocks = B * -(-S // 64) * channel_blocks  # slot tiles x channel blocks per batch element
    assert torch.ops.glmix_emulated.mma_chunks(L, 64, blocks)[1] == chunks
    case = Case(B, L, C, S, "nchw", dtype=dtype, seed=L + C)
    check_against_reference(case, "cluster", "cuda_emulated")


# (B, L, C, S, x layout): shapes whose backward takes fused_bwd_mma on the emulated device (one SM:
# one chunk per batch element from four blocks, or one pixel tile): odd L over two tiles with
# strided channels, odd C, all 64 slots and channels in one tile.
FUSED_SHAPES = [(4, 67, 24, 9, "sliced"), (4, 45, 33, 64, "nchw"), (1, 40, 64, 64, "nchw")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
@pytest.mark.parametrize("B,L,C,S,layout", FUSED_SHAPES)
def test_fused_backward_through_the_ops(op, dtype, B, L, C, S, layout):
    """The fused backward (fused_bwd_mma: S <= 64, C <= 64, one chunk per batch element) as the
    cuda_emulated ops launch it: forward and every gradient against the float64 reference within
    the suite's tolerances, with zero pixels except in fp16 (their dx, dK / 1e-12, overflows). The
    selection op (fused_bwd_applies) shows the case takes it."""
    require("cuda_emulated", "cpu")
    assert torch.ops.glmix_emulated.fused_bwd(B, L, S, C, dtype == torch.float32, op == "dispatch")
    case = Case(B, L, C, S, layout, dtype=dtype, seed=L + C)
    if dtype != torch.float16:
        case.view_x(case.x_base)[:, ::11] = 0
    check_against_reference(case, op, "cuda_emulated")


def test_fused_backward_where_it_applies():
    """fused_bwd_applies: one slot tile, C <= 64, one chunk per batch element. glnet_4g stage 1 (B =
    128, L = 3136, C = S = 64) on an H100's 132 SMs takes it; a batch that does not fill the SMs,
    S > 64 or C > 64 keeps pixel_bwd_mma and slot_bwd_mma, and so do the emulated tests' small grids
    that split L (test_mma_kernels_through_the_ops)."""
    require("cuda_emulated", "cpu")
    fused = torch.ops.glmix_emulated.fused_bwd
    for fp32 in (False, True):
        for dispatch in (False, True):
            assert fused(128, 3136, 64, 64, fp32, dispatch, 132)
            assert not fused(64, 3136, 64, 64, fp32, dispatch, 132)
            assert not fused(128, 3136, 65, 64, fp32, dispatch, 132)
            assert not fused(128, 196, 64, 65, fp32, dispatch, 132)
            assert not fused(2, 67, 9, 24, fp32, dispatch)  # emulated: two chunks
            assert not fused(1, 150, 70, 40, fp32, dispatch)


def test_resource_report_requires_tensor_cores_of_every_mma_kernel():
    """scripts/cuda_resource_report.py fails a build whose *_mma kernels (forward and backward)
    have no HMMA instruction; the CUDA-core kernels are exempt."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "scripts", "cuda_resource_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for kernel in (
        "cluster_fwd_chunk_mma<Bf16,64>",
        "dispatch_fwd_mma<Tf32,128>",
        "cluster_fwd_chunk_wide_mma<Bf16>",
        "pixel_bwd_wide_mma<Bf16,true>",
        "slot_bwd_wide_mma<Tf32,false>",
        "pixel_bwd_mma<F16,128,true>",
        "slot_bwd_mma<Bf16,16,false>",
        "fused_bwd_mma<Tf32,64,true>",
        "mma_tile_test<F16>",
    ):
        assert report.needs_tensor_cores(kernel), kernel
    for kernel in ("cluster_bwd_chunk<float>", "dispatch_fwd<Half>", "sum_chunks<float>"):
        assert not report.needs_tensor_cores(kernel), kernel
