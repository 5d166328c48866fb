"""The ``@triton.jit`` kernels of the ``"triton"`` backend; ``__init__.py`` sizes and launches them.

Every ``(rows, C)`` operand is addressed as ``base + row * s_row + c * s_c`` with the caller's
strides, so an NCHW view ``(C*L, 1, L)``, broadcast queries (batch stride 0) and expanded
gradients (stride 0) need no copy. Triton specialises integer arguments equal to 1, so the
compiler sees which dimension is contiguous and coalesces loads along it. Offsets are int64:
``B * L * C`` (and one batch's ``L * C`` under odd strides) may exceed 2**31.

Logits are never stored: each kernel recomputes ``A = qs @ x^T / ||x||`` for its tile (the dot
with raw ``x``, the per-pixel ``1/||x||`` applied after, both over the whole of ``C``), and all
softmax statistics and accumulators are fp32.
"""
import os

import triton
import triton.language as tl

# The interpreter runs on CPU tensors, one program after another: multi-config autotuning cannot
# time it, and its bf16 tl.dot is wrong (triton-lang/triton#11584).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Reduction kernels split L into chunks of a whole number of this many pixels, so no tile of any
# config straddles two chunks and the chunking does not depend on the config autotuning picks.
CHUNK_QUANTUM = 32 if INTERPRET else 128


def _configs(block_ls, block_cs, warps):
    if INTERPRET:  # one config; BLOCK_C below the test shapes' C so the C tiling runs
        return [triton.Config({"BLOCK_L": 32, "BLOCK_C": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_L": bl, "BLOCK_C": bc}, num_warps=w)
            for bl in block_ls for bc in block_cs for w in warps]


# Pixel kernels hold all S (up to 256) logits of a tile, so they take narrower pixel tiles.
_PIXEL_CONFIGS = _configs((16, 32, 64), (32, 64), (4, 8))
_REDUCE_CONFIGS = _configs((64, 128), (64, 128), (4, 8))
assert all(c.kwargs["BLOCK_L"] <= CHUNK_QUANTUM for c in _REDUCE_CONFIGS)


@triton.jit
def _tile_offsets(r0, c0, n_r, n_c, s_r, s_c, BR: tl.constexpr, BC: tl.constexpr):
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    offs = r.to(tl.int64)[:, None] * s_r + c.to(tl.int64)[None, :] * s_c
    return offs, (r < n_r)[:, None] & (c < n_c)[None, :]


@triton.jit
def _load(ptr, r0, c0, n_r, n_c, s_r, s_c, BR: tl.constexpr, BC: tl.constexpr):
    """Rows ``r0..`` (of ``n_r``) x columns ``c0..`` (of ``n_c``), zero outside."""
    offs, mask = _tile_offsets(r0, c0, n_r, n_c, s_r, s_c, BR, BC)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _store(ptr, val, r0, c0, n_r, n_c, s_r, s_c, BR: tl.constexpr, BC: tl.constexpr):
    offs, mask = _tile_offsets(r0, c0, n_r, n_c, s_r, s_c, BR, BC)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_and_block(pid, n, BLOCK: tl.constexpr):
    """The grid axis every kernel enumerates as (batch element, block of ``BLOCK`` along a
    dimension of size ``n``), block fastest: the int64 batch index and the block's first index."""
    n_blocks = tl.cdiv(n, BLOCK)
    return (pid // n_blocks).to(tl.int64), (pid % n_blocks) * BLOCK


@triton.jit
def _split_l_program(S, L, chunk_len, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's place on the grid ``(B * slot blocks, chunks, C blocks)`` of the split-L
    kernels (``cluster_fwd_partial``, ``reduce_bwd``): batch element ``b`` (int64), first slot
    ``s0``, first output channel ``c_out``, its chunk's pixels ``[l_begin, l_end)`` and its row
    ``b * chunks + chunk`` of the per-chunk workspaces."""
    b, s0 = _batch_and_block(tl.program_id(0), S, BLOCK_S)
    chunk = tl.program_id(1)
    l_begin = chunk * chunk_len
    l_end = tl.minimum(l_begin + chunk_len, L)
    return b, s0, tl.program_id(2) * BLOCK_C, l_begin, l_end, b * tl.num_programs(1) + chunk


@triton.jit
def _mm(a, b, DT: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32 from operands rounded to ``DT`` (``x``'s dtype).

    fp16/bf16 operands keep the tensor cores; fp32 uses "ieee" so it is not silently tf32.
    ``UPCAST`` (bf16 under the interpreter): the bf16-rounded operands are multiplied in fp32,
    the same products a bf16 tensor-core dot makes.
    """
    a = a.to(DT)
    b = b.to(DT)
    if UPCAST or DT == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _mm_fp32_a(a, b, DT: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` for an fp32 ``a`` that must keep (about) fp32 precision with half-precision ``b``.

    Two half-precision dots of ``a``'s high and low parts keep about 16 bits of ``a`` on tensor
    cores. Needed for the logits ``qs @ x^T``: rounding ``qs`` to bf16 puts an error of
    ``scale * 2**-9`` on every logit, which the softmax turns into that relative error on every
    probability; for ``dqs = dA @ K``: ``dscale = <dqs, q>`` sums terms that nearly cancel
    (softmax gradients sum to zero), so a bf16 ``dA`` left it several percent off; and for the
    slots ``P @ x``, for the same sum through clustering's ``delta`` (``cluster_fwd_partial``).
    """
    if DT == tl.float32:
        out = _mm(a, b, DT, UPCAST)
    else:
        a_hi, a_lo = _split(a, DT)
        out = _mm(a_hi, b, DT, UPCAST) + _mm(a_lo, b, DT, UPCAST)
    return out


@triton.jit
def _split(a, DT: tl.constexpr):
    """An fp32 ``a`` as ``hi + lo``: ``hi`` is ``a`` rounded to ``DT``, ``lo`` the fp32 rest."""
    hi = a.to(DT)
    return hi, a - hi.to(tl.float32)


@triton.jit
def _rowdot(a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, r0, R, C,
            BR: tl.constexpr, BC: tl.constexpr):
    """fp32 ``rowsum(a * b)`` for rows ``r0..r0+BR`` of two ``(R, C)`` operands."""
    acc = tl.zeros([BR], tl.float32)
    for c0 in range(0, C, BC):
        a = _load(a_ptr, r0, c0, R, C, sa_r, sa_c, BR, BC).to(tl.float32)
        b = _load(b_ptr, r0, c0, R, C, sb_r, sb_c, BR, BC).to(tl.float32)
        acc += tl.sum(a * b, 1)
    return acc


@triton.jit
def _logits(q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, y_ptr, sy_r, sy_c, g_ptr, sg_l, sg_c,
            s0, l0, S, L, C, SECOND: tl.constexpr,
            BS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, UPCAST: tl.constexpr):
    """One ``(BS, BL)`` tile of logits ``A`` over the whole of C, plus what shares its C loop.

    Returns ``A`` (``_mm_fp32_a``'s logits, the high and low parts summed over C separately),
    ``A_hi`` (the logits of ``qs`` rounded to x's dtype, the ``qs`` that ``pixel_bwd``'s dots
    for ``dK = dA^T qs`` see; ``A`` itself for fp32), a second score (``SECOND`` 0: none;
    1: ``y @ x^T``, clustering's ``dP = G x^T``; 2: ``y @ g^T``, dispatch's ``dD = slots Hg^T``),
    ``1/r`` and the pixel norms. Pixels ``>= L`` load as zeros.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    a_hi = tl.zeros([BS, BL], tl.float32)
    a_lo = tl.zeros([BS, BL], tl.float32)
    second = tl.zeros([BS, BL], tl.float32)
    sumsq = tl.zeros([BL], tl.float32)
    for c0 in range(0, C, BC):
        xt = _load(x_ptr, l0, c0, L, C, sx_l, sx_c, BL, BC)
        xf = xt.to(tl.float32)
        sumsq += tl.sum(xf * xf, 1)
        qt = _load(q_ptr, s0, c0, S, C, sq_s, sq_c, BS, BC)
        if DT == tl.float32:
            a_hi += _mm(qt, tl.trans(xt), DT, UPCAST)
        else:
            q_hi, q_lo = _split(qt, DT)
            a_hi += _mm(q_hi, tl.trans(xt), DT, UPCAST)
            a_lo += _mm(q_lo, tl.trans(xt), DT, UPCAST)
        if SECOND == 1:
            second += _mm(_load(y_ptr, s0, c0, S, C, sy_r, sy_c, BS, BC), tl.trans(xt), DT, UPCAST)
        if SECOND == 2:
            gt = _load(g_ptr, l0, c0, L, C, sg_l, sg_c, BL, BC)
            second += _mm(_load(y_ptr, s0, c0, S, C, sy_r, sy_c, BS, BC), tl.trans(gt), DT, UPCAST)
    norm = tl.sqrt(sumsq)
    inv_r = 1.0 / tl.maximum(norm, 1e-12)
    a = a_hi
    if DT != tl.float32:
        a += a_lo
    return a * inv_r[None, :], a_hi * inv_r[None, :], second, inv_r, norm


@triton.jit
def _grad_logits(q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, y_ptr, sy_r, sy_c, g_ptr, sg_l, sg_c,
                 lse, delta, s0, l0, S, L, C, CLUSTER: tl.constexpr,
                 BS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, UPCAST: tl.constexpr):
    """Recomputed probabilities ``P = exp(A - lse)`` and ``dA = P * (dP - delta)`` of one tile.

    ``lse`` and ``delta`` come broadcastable to the tile: per slot ``(BS, 1)`` for clustering
    (softmax over L), per pixel ``(1, BL)`` for dispatch (softmax over S). ``delta=None``, for a
    dispatch tile holding all S slots: ``delta' = colsum(P * dD)`` of this tile in fp32, exactly
    the sum that makes ``dA`` consistent with the ``P`` recomputed here; ``rowsum(Hg * out)`` is
    equal only in exact arithmetic (a half-precision forward rounds ``D`` before the value
    product). Padding rows and columns get ``P = dA = 0``, so they add nothing to any sum over
    the tile. Returns ``A_hi`` (see ``_logits``), ``P, dA, delta, 1/r`` and the pixel norms.
    """
    a, a_hi, dp, inv_r, norm = _logits(q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, y_ptr, sy_r, sy_c,
                                       g_ptr, sg_l, sg_c, s0, l0, S, L, C, 1 if CLUSTER else 2,
                                       BS, BL, BC, UPCAST)
    valid = (s0 + tl.arange(0, BS) < S)[:, None] & (l0 + tl.arange(0, BL) < L)[None, :]
    p = tl.where(valid, tl.exp(a - lse), 0.0)
    if delta is None:
        # Dispatch: sum_s D dD / sum_s D. The recomputed D sums to 1 only up to lse's rounding
        # (about |A| * 2^-24, visible at large temperatures); dividing keeps sum_s dA = 0 exactly.
        # Padding pixels have no D at all: divide by 1 there.
        psum = tl.sum(p, 0)
        delta = (tl.sum(p * dp, 0) / tl.where(psum > 0, psum, 1.0))[None, :]
    return a_hi, p, p * (dp - delta), delta, inv_r, norm


@triton.jit
def cluster_fwd_partial(x_ptr, q_ptr, m_ptr, l_ptr, acc_ptr, S, L, C, chunk_len,
                        sx_b, sx_l, sx_c, sq_b, sq_s, sq_c,
                        BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                        UPCAST: tl.constexpr):
    """Online softmax over one L chunk for a block of slots: partial max ``m``, sum ``l`` and
    unnormalised ``acc = sum exp(A - m) x`` (columns of this program's C block) per chunk.

    Grid (B * slot blocks, chunks, C blocks); the workspaces are contiguous fp32
    ``(B, chunks, S)`` and ``(B, chunks, S, C)``. Each C block recomputes the logits over all of
    C: the accumulator of every C at once would not fit in registers. ``P @ x`` keeps about 16
    bits of ``P`` (``_mm_fp32_a``): the backward's ``delta = rowsum(G * slots)`` must equal
    ``rowsum(P * dP)`` over the fp32 ``P`` it recomputes, and slots from a bf16-rounded ``P``
    biased ``dscale`` by up to a few percent.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, s0, c_out, l_begin, l_end, row = _split_l_program(S, L, chunk_len, BLOCK_S, BLOCK_C)
    x_ptr += b * sx_b
    q_ptr += b * sq_b

    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    tot = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for l0 in range(l_begin, l_end, BLOCK_L):
        a, _, _, _, _ = _logits(q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, q_ptr, 0, 0, x_ptr, 0, 0,
                                s0, l0, S, l_end, C, 0, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST)
        a = tl.where((l0 + tl.arange(0, BLOCK_L) < l_end)[None, :], a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, 1))  # finite: every tile has a pixel < l_end
        alpha = tl.exp(m - m_new)
        p = tl.exp(a - m_new[:, None])
        tot = tot * alpha + tl.sum(p, 1)
        xt = _load(x_ptr, l0, c_out, l_end, C, sx_l, sx_c, BLOCK_L, BLOCK_C)
        acc = acc * alpha[:, None] + _mm_fp32_a(p, xt, DT, UPCAST)
        m = m_new

    _store(acc_ptr + row * S * C, acc, s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)
    if tl.program_id(2) == 0:
        s = s0 + tl.arange(0, BLOCK_S)
        tl.store(m_ptr + row * S + s, m, mask=s < S)
        tl.store(l_ptr + row * S + s, tot, mask=s < S)


@triton.jit
def cluster_fwd_combine(m_ptr, l_ptr, acc_ptr, slots_ptr, lse_ptr, S, C, n_chunks,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the chunks' partials by log-sum-exp, in chunk order (bitwise deterministic).

    Grid (B * slot blocks, C blocks); ``slots`` (B, S, C) and ``lse`` (B, S) are contiguous
    fp32: the backward's ``delta = rowsum(G * slots)`` needs them unrounded.
    """
    b, s0 = _batch_and_block(tl.program_id(0), S, BLOCK_S)
    c0 = tl.program_id(1) * BLOCK_C
    s = s0 + tl.arange(0, BLOCK_S)

    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    tot = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for k in range(0, n_chunks):
        row = b * n_chunks + k
        m_k = tl.load(m_ptr + row * S + s, mask=s < S, other=0.0)
        l_k = tl.load(l_ptr + row * S + s, mask=s < S, other=1.0)
        acc_k = _load(acc_ptr + row * S * C, s0, c0, S, C, C, 1, BLOCK_S, BLOCK_C)
        m_new = tl.maximum(m, m_k)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_k - m_new)
        tot = tot * alpha + l_k * beta
        acc = acc * alpha[:, None] + acc_k * beta[:, None]
        m = m_new

    _store(slots_ptr + b * S * C, acc / tot[:, None], s0, c0, S, C, C, 1, BLOCK_S, BLOCK_C)
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + b * S + s, m + tl.log(tot), mask=s < S)


@triton.jit
def dispatch_fwd(x_ptr, q_ptr, v_ptr, out_ptr, lse_ptr, S, L, C,
                 sx_b, sx_l, sx_c, sq_b, sq_s, sq_c, sv_b, sv_s, sv_c,
                 BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Softmax over all S slots for a tile of pixels, then ``out = D^T @ slots``.

    Grid (B * pixel tiles,); ``out`` (B, L, C) and ``lse`` (B, L) are contiguous.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, l0 = _batch_and_block(tl.program_id(0), L, BLOCK_L)
    x_ptr += b * sx_b
    q_ptr += b * sq_b
    v_ptr += b * sv_b

    a, _, _, _, _ = _logits(q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, q_ptr, 0, 0, x_ptr, 0, 0,
                            0, l0, S, L, C, 0, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST)
    a = tl.where((tl.arange(0, BLOCK_S) < S)[:, None], a, float("-inf"))
    m = tl.max(a, 0)
    e = tl.exp(a - m[None, :])
    tot = tl.sum(e, 0)
    d = e / tot[None, :]
    pix = l0 + tl.arange(0, BLOCK_L)
    tl.store(lse_ptr + b * L + pix, m + tl.log(tot), mask=pix < L)

    for c0 in range(0, C, BLOCK_C):
        vt = _load(v_ptr, 0, c0, S, C, sv_s, sv_c, BLOCK_S, BLOCK_C)
        _store(out_ptr + b * L * C, _mm(tl.trans(d), vt, DT, UPCAST),
               l0, c0, L, C, C, 1, BLOCK_L, BLOCK_C)


@triton.jit
def pixel_bwd(x_ptr, q_ptr, g_ptr, v_ptr, lse_ptr, dx_ptr, delta_ptr, S, L, C,
              sx_b, sx_l, sx_c, sq_b, sq_s, sq_c, sg_b, sg_r, sg_c, sv_b, sv_s, sv_c,
              CLUSTER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
              BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """``dx`` for a tile of pixels, all S slots in the tile (``dx`` is local per pixel).

    ``g``: the incoming gradient (clustering: ``(B, S, C)``, dispatch: ``(B, L, C)``), ``v``: the
    ``(B, S, C)`` slots (clustering's fp32 forward result, dispatch's values).
    ``dx = [P^T G] + (dK - K <K, dK>) / r`` with ``dK = dA^T qs`` and ``<K, dK> = colsum(dA * A)``
    (``A = qs K^T``), so the projection needs no second pass over C. ``<K, dK>`` is that of the
    ``dK`` the dots compute: from ``dA`` rounded to x's dtype and ``A_hi``, the logits of the
    rounded ``qs``. The projection then removes the along-``K`` part of ``dK``'s rounding error,
    which the accurate ``A`` would leave in, amplified by ``1/r`` at small ``||x||`` (with C = 1
    the key path is all along ``K``: it must come out zero). Dispatch also writes its
    ``delta' = colsum(D * dD)`` (B, L), summed over the tile's S slots, for ``reduce_bwd``, whose
    slot blocks may hold only some of them. Grid (B * pixel tiles,); ``dx`` is contiguous.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, l0 = _batch_and_block(tl.program_id(0), L, BLOCK_L)
    x_ptr += b * sx_b
    q_ptr += b * sq_b
    g_ptr += b * sg_b
    v_ptr += b * sv_b
    s = tl.arange(0, BLOCK_S)
    pix = l0 + tl.arange(0, BLOCK_L)

    if CLUSTER:
        delta = _rowdot(g_ptr, sg_r, sg_c, v_ptr, sv_s, sv_c, 0, S, C, BLOCK_S, BLOCK_C)[:, None]
        lse = tl.load(lse_ptr + b * S + s, mask=s < S, other=0.0)[:, None]
        y_ptr, sy_r, sy_c = g_ptr, sg_r, sg_c
    else:
        delta = None  # from the tile: it holds all S slots
        lse = tl.load(lse_ptr + b * L + pix, mask=pix < L, other=0.0)[None, :]
        y_ptr, sy_r, sy_c = v_ptr, sv_s, sv_c
    a_hi, p, da, delta, inv_r, norm = _grad_logits(
        q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, y_ptr, sy_r, sy_c, g_ptr, sg_r, sg_c,
        lse, delta, 0, l0, S, L, C, CLUSTER, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST)
    if not CLUSTER:
        tl.store(delta_ptr + b * L + pix[None, :], delta, mask=(pix < L)[None, :])
    # F.normalize clamps the norm at eps: below it, x / eps has no projection term.
    kdk = tl.where(norm >= 1e-12, tl.sum(da.to(DT).to(tl.float32) * a_hi, 0), 0.0)

    for c0 in range(0, C, BLOCK_C):
        qt = _load(q_ptr, 0, c0, S, C, sq_s, sq_c, BLOCK_S, BLOCK_C)
        xt = _load(x_ptr, l0, c0, L, C, sx_l, sx_c, BLOCK_L, BLOCK_C).to(tl.float32)
        dx = (_mm(tl.trans(da), qt, DT, UPCAST) - xt * (inv_r * kdk)[:, None]) * inv_r[:, None]
        if CLUSTER:
            gt = _load(g_ptr, 0, c0, S, C, sg_r, sg_c, BLOCK_S, BLOCK_C)
            dx += _mm(tl.trans(p), gt, DT, UPCAST)
        _store(dx_ptr + b * L * C, dx, l0, c0, L, C, C, 1, BLOCK_L, BLOCK_C)


@triton.jit
def reduce_bwd(x_ptr, q_ptr, g_ptr, v_ptr, lse_ptr, delta_ptr, dq_ptr, dv_ptr,
               S, L, C, chunk_len,
               sx_b, sx_l, sx_c, sq_b, sq_s, sq_c, sg_b, sg_r, sg_c, sv_b, sv_s, sv_c,
               CLUSTER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
               BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """One L chunk's share of the sums over pixels: ``dqs = dA @ K``, and for dispatch
    ``dslots = D @ Hg``, for a block of slots and one C block.

    Arguments as in ``pixel_bwd``; dispatch reads the ``delta'`` that ``pixel_bwd`` wrote.
    Grid (B * slot blocks, chunks, C blocks); partials go to contiguous fp32 workspaces
    ``(B, chunks, S, C)`` that ``sum_chunks`` reduces.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, s0, c_out, l_begin, l_end, row = _split_l_program(S, L, chunk_len, BLOCK_S, BLOCK_C)
    x_ptr += b * sx_b
    q_ptr += b * sq_b
    g_ptr += b * sg_b
    v_ptr += b * sv_b
    s = s0 + tl.arange(0, BLOCK_S)

    if CLUSTER:
        delta_s = _rowdot(g_ptr, sg_r, sg_c, v_ptr, sv_s, sv_c, s0, S, C, BLOCK_S, BLOCK_C)[:, None]
        lse_s = tl.load(lse_ptr + b * S + s, mask=s < S, other=0.0)[:, None]
    dq = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for l0 in range(l_begin, l_end, BLOCK_L):
        if CLUSTER:
            _, p, da, _, inv_r, norm = _grad_logits(
                q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, g_ptr, sg_r, sg_c, g_ptr, sg_r, sg_c,
                lse_s, delta_s, s0, l0, S, l_end, C, CLUSTER, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST)
        else:
            pix = l0 + tl.arange(0, BLOCK_L)
            lse_l = tl.load(lse_ptr + b * L + pix, mask=pix < l_end, other=0.0)[None, :]
            delta_l = tl.load(delta_ptr + b * L + pix, mask=pix < l_end, other=0.0)[None, :]
            _, p, da, _, inv_r, norm = _grad_logits(
                q_ptr, sq_s, sq_c, x_ptr, sx_l, sx_c, v_ptr, sv_s, sv_c, g_ptr, sg_r, sg_c,
                lse_l, delta_l, s0, l0, S, l_end, C, CLUSTER, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST)
            gt = _load(g_ptr, l0, c_out, l_end, C, sg_r, sg_c, BLOCK_L, BLOCK_C)
            dv += _mm(p, gt, DT, UPCAST)
        # dA @ K as (dA * m) @ (x * 2**e) with 1/r = m * 2**e: the power-of-two scaling is exact
        # in x's dtype and keeps |x * 2**e| <= 1, where dA / r would overflow fp16 at tiny norms.
        pow2 = (inv_r.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        xt = _load(x_ptr, l0, c_out, l_end, C, sx_l, sx_c, BLOCK_L, BLOCK_C).to(tl.float32)
        dq += _mm_fp32_a(da * (inv_r / pow2)[None, :], xt * pow2[:, None], DT, UPCAST)

    _store(dq_ptr + row * S * C, dq, s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)
    if not CLUSTER:
        _store(dv_ptr + row * S * C, dv, s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)


@triton.jit
def sum_chunks(ws_ptr, out_ptr, n_chunks, N, BLOCK: tl.constexpr):
    """``out[b] = sum_k ws[b, k]`` over ``(B, chunks, N)``, in chunk order (bitwise deterministic).

    Grid (B * blocks of N,); ``out`` (B, N) contiguous.
    """
    b, i0 = _batch_and_block(tl.program_id(0), N, BLOCK)
    i = i0 + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(0, n_chunks):
        acc += tl.load(ws_ptr + (b * n_chunks + k) * N + i, mask=i < N, other=0.0)
    tl.store(out_ptr + b * N + i, acc.to(out_ptr.dtype.element_ty), mask=i < N)


def _autotuned(configs):
    # Keyed on the shape that decides register pressure; triton adds the tensors' dtypes.
    return triton.autotune(configs=configs, key=["S", "C"])


cluster_fwd_partial = _autotuned(_REDUCE_CONFIGS)(cluster_fwd_partial)
reduce_bwd = _autotuned(_REDUCE_CONFIGS)(reduce_bwd)
dispatch_fwd = _autotuned(_PIXEL_CONFIGS)(dispatch_fwd)
pixel_bwd = _autotuned(_PIXEL_CONFIGS)(pixel_bwd)
