"""The ``@triton.jit`` kernels of the ``"triton"`` backend; ``__init__.py`` sizes and launches them.

Kernels, in the order a call runs them:

- ``scaled_queries``: ``qs = scale * init_slots / ||init_slots||`` (the norm in fp64), written once
  per call as two operands in x's dtype, ``qs_hi + qs_lo`` (fp32 ``x``: ``qs`` itself), so the
  other kernels never split it again; the backward's launch also writes clustering's
  ``delta = rowsum(G * slots)`` once. Kernels that read each S x C operand once per program
  (any holding all of C, ``cluster_fwd_tile``, ``pixel_bwd`` with one tile per chunk) or load
  them per pixel tile anyway (16-bit ``dispatch_fwd`` over C blocks) make ``qs`` themselves
  with the same arithmetic (``_query_norms``, ``_split_queries``; ``NORMALIZE``) and no
  ``scaled_queries`` runs.
- ``cluster_fwd_chunk`` / ``cluster_fwd_combine``: per-chunk online-softmax partials over L, then
  their log-sum-exp combine; ``cluster_fwd_tile``: the same for few pixels and many channels,
  one tile of all slots per chunk.
- ``dispatch_fwd``: softmax over all S slots per pixel tile, ``out = D^T slots``.
- ``pixel_bwd``: ``dx`` per pixel tile (and dispatch's ``delta'``), and where one tile holds all
  slots and all of C or a whole chunk, the chunk's sums of ``dqs`` (and ``dslots``); else
  ``slot_bwd``: per chunk, the partial sums over L of ``dqs`` (and ``dslots``); ``query_bwd``: the
  chunk sum of ``dqs`` and the normalisation's backward into ``d_init_slots`` and per-program
  parts of ``dscale``; ``sum_chunks``: chunk-ordered sums (``dslots``, ``dscale``).

Every ``(rows, C)`` input is addressed as ``base + row * s_row + c * s_c`` with the caller's
strides, so an NCHW view ``(C*L, 1, L)``, broadcast slots (batch stride 0) and expanded gradients
(stride 0) need no copy. Triton specialises integer arguments equal to 1, so the compiler sees
which dimension is contiguous. Offsets are int64: ``B * L * C`` may exceed 2**31.

Logits are never stored: each kernel recomputes ``A = qs @ x^T / ||x||`` for its tile (the dot
with raw ``x``, the per-pixel ``1/||x||`` applied after), and all softmax statistics and
accumulators are fp32. With ``ONE_C_BLOCK`` (all of C in one tile, fixed at compile time) the
S x C operands are loaded once per program before the loop over pixel tiles, and each ``x`` tile
serves both the logits and the value product. Wider, the logits take ``BLOCK_C`` channels at a
time (split-L kernels: ``SCORE_C``, and their sums span C blocks as wide as fit in registers, so
most tiles' logits are computed once rather than once per 64 channels).
"""

import os

import triton
import triton.language as tl

# The interpreter runs on CPU tensors, one program after another, and its bf16 tl.dot is wrong
# (triton-lang/triton#11584): bf16 operands are upcast to fp32 there (the ``UPCAST`` flag).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Split-L kernels cut L into chunks of a whole number of this many pixels, so no tile of any
# config straddles two chunks and the chunking does not depend on the config.
CHUNK_QUANTUM = 32 if INTERPRET else 128

# torch.nn.functional.normalize's eps: norms are clamped to at least this.
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)
# Pixels, spread evenly over L, whose keys' mean clustering's dqs is centred on (``_key_mean``).
N_SAMPLE: tl.constexpr = tl.constexpr(32)
# How many of them ``_key_mean_of`` loads at a time: small tiles beside a kernel's sums.
SAMPLE_ROWS: tl.constexpr = tl.constexpr(8)
# The exponent bits of an fp32: ``bits & FP32_EXPONENT_BITS`` is the power of two below a value.
FP32_EXPONENT_BITS: tl.constexpr = tl.constexpr(0x7F800000)

# What ``_scores`` computes beside the logits in the same loop over C.
SCORE_NONE: tl.constexpr = tl.constexpr(0)
SCORE_ROWS_X: tl.constexpr = tl.constexpr(1)  # clustering's dP = G x^T (rows: G)
SCORE_ROWS_G: tl.constexpr = tl.constexpr(2)  # dispatch's dD = slots Hg^T (rows: slots)

# Layout of x, an autotuning key: the same shape tunes differently channels-last and NCHW.
LAYOUT_CHANNELS_LAST = 0
LAYOUT_NCHW = 1
LAYOUT_OTHER = 2


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
def _chunk(L, chunk_len):
    """Pixels ``[l_begin, l_end)`` of this program's chunk (grid axis 1)."""
    l_begin = tl.program_id(1) * chunk_len
    return l_begin, tl.minimum(l_begin + chunk_len, L)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32 for operands in x's dtype.

    fp32 takes three tf32 products per dot (``tf32x3``): tensor cores at about fp32 accuracy.
    ``UPCAST`` (bf16 under the interpreter): the bf16 operands multiplied in fp32, the products
    a bf16 tensor-core dot makes.
    """
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _dot_fp32_a(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` for an fp32 ``a`` that must keep about fp32 precision, ``b`` in x's dtype.

    Half precision: ``a = hi + lo``, two dots, about 16 bits of ``a``. Needed where the rounding
    of ``a`` would bias a sum that cancels: ``P @ x`` (the slots, read back by clustering's
    ``delta``) and ``dA @ K`` (``dqs``, whose ``<dqs, q>`` is ``dscale``).
    """
    if b.dtype == tl.float32:
        out = _dot(a, b, acc, UPCAST)
    else:
        hi = a.to(b.dtype)
        out = _dot(hi, b, acc, UPCAST)
        out = _dot((a - hi.to(tl.float32)).to(b.dtype), b, out, UPCAST)
    return out


@triton.jit
def _logits_of_tile(q_hi, q_lo, xt, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """``(qs_hi @ xt^T, qs_hi @ xt^T + qs_lo @ xt^T)`` of one C block: the logits of the
    rounded ``qs`` (what ``pixel_bwd``'s ``dK = dA^T qs`` sees) and the accurate ones."""
    a_hi = _dot(q_hi, tl.trans(xt), None, UPCAST)
    a = a_hi
    if SPLIT:
        a = _dot(q_lo, tl.trans(xt), a_hi, UPCAST)
    return a_hi, a


@triton.jit
def _inv_norm(sumsq):
    """``1 / max(||x||, eps)`` per pixel from the fp32 sum of squares."""
    return 1.0 / tl.maximum(tl.sqrt(sumsq), NORM_EPS)


@triton.jit
def _sample(x_ptr, L, c0, C, sx_l, sx_c, BC: tl.constexpr, j0=0, ROWS: tl.constexpr = N_SAMPLE):
    """Channels ``c0..`` of ``N_SAMPLE`` pixels spread evenly over all of L (or of ``ROWS`` of
    them from the ``j0``-th), in fp32: the same pixels for every chunk of a batch element."""
    rows = ((j0 + tl.arange(0, ROWS)).to(tl.int64) * L) // N_SAMPLE
    c = c0 + tl.arange(0, BC)
    offs = rows[:, None] * sx_l + c.to(tl.int64)[None, :] * sx_c
    return tl.load(x_ptr + offs, mask=(c < C)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _sample_inv_norms(x_ptr, L, C, sx_l, sx_c, BC: tl.constexpr):
    """``1 / ||x||`` of the ``_sample`` pixels, over all of C in ``BC``-channel steps."""
    sumsq = tl.zeros([N_SAMPLE], tl.float32)
    for c0 in range(0, C, BC):
        t = _sample(x_ptr, L, c0, C, sx_l, sx_c, BC)
        sumsq += tl.sum(t * t, 1)
    return _inv_norm(sumsq)


@triton.jit
def _key_mean(x_ptr, inv_n, L, c0, C, sx_l, sx_c, BC: tl.constexpr):
    """The mean key ``m`` of the ``_sample`` pixels (``inv_n``: their ``_sample_inv_norms``),
    channels ``c0..``: about the direction the keys share, if they share one."""
    return tl.sum(_sample(x_ptr, L, c0, C, sx_l, sx_c, BC) * inv_n[:, None], 0) / N_SAMPLE


@triton.jit
def _key_mean_of(x_ptr, L, c0, C, sx_l, sx_c, BC: tl.constexpr, NORM_C: tl.constexpr):
    """``_key_mean`` with the norms taken on the way (``NORM_C`` channels a step), ``SAMPLE_ROWS``
    pixels at a time: for a kernel's last step, beside its sums."""
    m = tl.zeros([BC], tl.float32)
    for j0 in range(0, N_SAMPLE, SAMPLE_ROWS):
        sumsq = tl.zeros([SAMPLE_ROWS], tl.float32)
        for c1 in range(0, C, NORM_C):
            t = _sample(x_ptr, L, c1, C, sx_l, sx_c, NORM_C, j0, SAMPLE_ROWS)
            sumsq += tl.sum(t * t, 1)
        t = _sample(x_ptr, L, c0, C, sx_l, sx_c, BC, j0, SAMPLE_ROWS)
        m += tl.sum(t * _inv_norm(sumsq)[:, None], 0)
    return m / N_SAMPLE


@triton.jit
def _centring_norms(x_ptr, L, C, sx_l, sx_c, CENTRE: tl.constexpr, BC: tl.constexpr):
    """``_sample_inv_norms`` where ``CENTRE`` (``_dx_tile``'s slot sums over C blocks), else
    an unused zero."""
    if CENTRE:
        inv_n = _sample_inv_norms(x_ptr, L, C, sx_l, sx_c, BC)
    else:
        inv_n = 0.0
    return inv_n


@triton.jit
def _centred_dqs(dq, da_sum, k_mean):
    """Clustering's ``dqs = sum_l dA (k_l - m)``: the ``dA K`` of the products less
    ``(sum_l dA) m`` in fp32. Equal in exact arithmetic (``sum_l dA = 0`` over all of L), but the
    error that ``delta`` (from the forward's slots) carries into ``dA`` then reaches ``dqs`` times
    ``P K - m``, not times the keys' shared direction ``P K`` (math.md#centred-dqs)."""
    return dq - da_sum[:, None] * k_mean[None, :]


@triton.jit
def _query_norms(s0_ptr, ss_s, ss_c, s0, S, C, BS: tl.constexpr, BC: tl.constexpr):
    """``1 / max(||init_slots||, eps)`` of slots ``s0..``, in fp64: ``q`` is what the backward's
    projection removes from ``dq``, its rounding would not cancel."""
    sumsq = tl.zeros([BS], tl.float64)
    for c0 in range(0, C, BC):
        t = _load(s0_ptr, s0, c0, S, C, ss_s, ss_c, BS, BC).to(tl.float64)
        sumsq += tl.sum(t * t, 1)
    return 1.0 / tl.maximum(tl.sqrt(sumsq), NORM_EPS)


@triton.jit
def _query_norms_if(
    NORMALIZE: tl.constexpr, s0_ptr, scale_ptr, ss_s, ss_c, s0, S, C, BS: tl.constexpr, BC: tl.constexpr
):
    """``(inv_q, scale)`` for ``_query_block``'s ``NORMALIZE`` (unused zeros without it)."""
    if NORMALIZE:
        inv_q = _query_norms(s0_ptr, ss_s, ss_c, s0, S, C, BS, BC)
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        inv_q = 0.0
        scale = 0.0
    return inv_q, scale


@triton.jit
def _split_queries(t, inv_q, scale, DT: tl.constexpr):
    """``qs = scale * q`` of an ``init_slots`` block ``t`` (``q`` rounded to fp32, the product in
    fp32) as ``(qs_hi, qs_lo)`` in ``DT``."""
    qs = scale * (t.to(tl.float64) * inv_q[:, None]).to(tl.float32)
    hi = qs.to(DT)
    return hi, (qs - hi.to(tl.float32)).to(DT)


@triton.jit
def _query_block(
    qh_ptr,
    ql_ptr,
    sq_s,
    s0_ptr,
    ss_s,
    ss_c,
    inv_q,
    scale,
    s0,
    c0,
    S,
    C,
    NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    DT: tl.constexpr,
):
    """``(qs_hi, qs_lo)`` of slots ``s0..`` and channels ``c0..``: loaded (``qs_lo`` is ``qs_hi``
    without ``SPLIT``), or with ``NORMALIZE`` made from ``init_slots`` as ``scaled_queries``
    makes them (``inv_q`` from ``_query_norms``)."""
    if NORMALIZE:
        q_hi, q_lo = _split_queries(_load(s0_ptr, s0, c0, S, C, ss_s, ss_c, BS, BC), inv_q, scale, DT)
    else:
        q_hi = _load(qh_ptr, s0, c0, S, C, sq_s, 1, BS, BC)
        q_lo = q_hi
        if SPLIT:
            q_lo = _load(ql_ptr, s0, c0, S, C, sq_s, 1, BS, BC)
    return q_hi, q_lo


@triton.jit
def _delta_rows(g_ptr, sg_s, sg_c, v_ptr, sv_s, sv_c, s0, S, C, BS: tl.constexpr, BC: tl.constexpr):
    """Clustering's ``delta = rowsum(G * slots)`` of slots ``s0..``, in fp32."""
    delta = tl.zeros([BS], tl.float32)
    for c0 in range(0, C, BC):
        g = _load(g_ptr, s0, c0, S, C, sg_s, sg_c, BS, BC).to(tl.float32)
        v = _load(v_ptr, s0, c0, S, C, sv_s, sv_c, BS, BC).to(tl.float32)
        delta += tl.sum(g * v, 1)
    return delta


@triton.jit
def _scores(
    qh_ptr,
    ql_ptr,
    sq_s,
    s0_ptr,
    ss_s,
    ss_c,
    inv_q,
    scale,
    x_ptr,
    sx_l,
    sx_c,
    y_ptr,
    sy_r,
    sy_c,
    g_ptr,
    sg_l,
    sg_c,
    s0,
    l0,
    S,
    L,
    C,
    SECOND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Unnormalised logits of one ``(BS, BL)`` tile over all of C (several C blocks), plus what
    shares its C loop: ``(A_hi, A, second, sum of squares of x)`` with ``A = qs x^T`` before the
    per-pixel ``1/||x||``; ``second`` is ``SCORE_ROWS_X``: ``y x^T``, ``SCORE_ROWS_G``: ``y g^T``.
    Pixels ``>= L`` load as zeros. ``qs`` as ``_query_block`` gives it.
    """
    a_hi = tl.zeros([BS, BL], tl.float32)
    a = tl.zeros([BS, BL], tl.float32)
    second = tl.zeros([BS, BL], tl.float32)
    sumsq = tl.zeros([BL], tl.float32)
    for c0 in range(0, C, BC):
        xt = _load(x_ptr, l0, c0, L, C, sx_l, sx_c, BL, BC)
        xf = xt.to(tl.float32)
        sumsq += tl.sum(xf * xf, 1)
        q_hi, q_lo = _query_block(
            qh_ptr, ql_ptr, sq_s, s0_ptr, ss_s, ss_c, inv_q, scale, s0, c0, S, C, NORMALIZE, SPLIT, BS, BC, xt.dtype
        )
        a_hi = _dot(q_hi, tl.trans(xt), a_hi, UPCAST)
        if SPLIT:
            a = _dot(q_lo, tl.trans(xt), a, UPCAST)
        if SECOND == SCORE_ROWS_X:
            yt = _load(y_ptr, s0, c0, S, C, sy_r, sy_c, BS, BC).to(xt.dtype)
            second = _dot(yt, tl.trans(xt), second, UPCAST)
        if SECOND == SCORE_ROWS_G:
            yt = _load(y_ptr, s0, c0, S, C, sy_r, sy_c, BS, BC).to(xt.dtype)
            gt = _load(g_ptr, l0, c0, L, C, sg_l, sg_c, BL, BC)
            second = _dot(yt, tl.trans(gt), second, UPCAST)
    return a_hi, a + a_hi, second, sumsq


@triton.jit
def _tile_logits(
    qh_ptr,
    ql_ptr,
    x_ptr,
    sx_l,
    sx_c,
    s0_ptr,
    ss_s,
    ss_c,
    inv_q,
    scale,
    s0,
    l0,
    S,
    n_l,
    C,
    NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``(A, sum of squares of x)`` of one tile over ``BC``-channel steps: the forward kernels'
    ``_scores``, without a second product."""
    _, a, _, sumsq = _scores(
        qh_ptr,
        ql_ptr,
        C,
        s0_ptr,
        ss_s,
        ss_c,
        inv_q,
        scale,
        x_ptr,
        sx_l,
        sx_c,
        qh_ptr,
        0,
        0,
        x_ptr,
        0,
        0,
        s0,
        l0,
        S,
        n_l,
        C,
        SCORE_NONE,
        NORMALIZE,
        SPLIT,
        BS,
        BL,
        BC,
        UPCAST,
    )
    return a, sumsq


@triton.jit
def scaled_queries(
    s0_ptr,
    scale_ptr,
    qh_ptr,
    ql_ptr,
    g_ptr,
    v_ptr,
    delta_ptr,
    Bq,
    S,
    C,
    ss_b,
    ss_s,
    ss_c,
    sg_b,
    sg_s,
    sg_c,
    sv_b,
    sv_s,
    sv_c,
    SPLIT: tl.constexpr,
    WITH_DELTA: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``qs = scale * q``, ``q = init_slots / max(||init_slots||, eps)``, for a block of slots.

    The norm in fp64 (``q`` is what the backward's projection removes from ``dq``: its rounding
    would not cancel), ``q`` rounded to fp32, the product in fp32. ``qs`` goes to contiguous
    ``(Bq, S, C)`` operands in x's dtype, ``qs_hi + qs_lo`` (``SPLIT``; else ``qs`` alone).
    ``WITH_DELTA`` (clustering's backward): also ``delta = rowsum(G * slots)`` (B, S) in fp32,
    the grid then covers the B of ``x`` and only the first ``Bq`` batch rows write ``qs``.
    Grid (batch x slot blocks,).
    """
    b, s0 = _batch_and_block(tl.program_id(0), S, BLOCK_S)
    s = s0 + tl.arange(0, BLOCK_S)
    if b < Bq:
        inv_q = _query_norms(s0_ptr + b * ss_b, ss_s, ss_c, s0, S, C, BLOCK_S, BLOCK_C)
        scale = tl.load(scale_ptr).to(tl.float32)
        for c0 in range(0, C, BLOCK_C):
            t = _load(s0_ptr + b * ss_b, s0, c0, S, C, ss_s, ss_c, BLOCK_S, BLOCK_C)
            hi, lo = _split_queries(t, inv_q, scale, qh_ptr.dtype.element_ty)
            _store(qh_ptr + b * S * C, hi, s0, c0, S, C, C, 1, BLOCK_S, BLOCK_C)
            if SPLIT:
                _store(ql_ptr + b * S * C, lo, s0, c0, S, C, C, 1, BLOCK_S, BLOCK_C)
    if WITH_DELTA:
        delta = _delta_rows(g_ptr + b * sg_b, sg_s, sg_c, v_ptr + b * sv_b, sv_s, sv_c, s0, S, C, BLOCK_S, BLOCK_C)
        tl.store(delta_ptr + b * S + s, delta, mask=s < S)


@triton.jit
def cluster_fwd_chunk(
    x_ptr,
    qh_ptr,
    ql_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    s0_ptr,
    scale_ptr,
    S,
    L,
    C,
    chunk_len,
    sx_b,
    sx_l,
    sx_c,
    sq_b,
    ss_b,
    ss_s,
    ss_c,
    ONE_CHUNK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    X_LAYOUT: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SCORE_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax over one L chunk for a block of slots: partial max ``m``, sum ``l`` and
    unnormalised ``acc = sum exp(A - m) x`` (columns of this program's C block) per chunk.

    Grid (B * slot blocks, chunks, C blocks); the workspaces are contiguous fp32
    ``(B, chunks, S)`` and ``(B, chunks, S, C)``. Without ``ONE_C_BLOCK`` the S x C operands are
    too large to hold across the pixel loop: the logits take ``SCORE_C`` channels at a time, over
    all of C, and each C block computes them again (one C block spans all of C where the
    accumulator fits, so most shapes compute them once); with ``ONE_C_BLOCK`` and ``NORMALIZE``
    the program makes its ``qs`` block from ``init_slots`` (``s0``) and ``scale`` itself.
    ``P @ x`` keeps about 16 bits of ``P`` (``_dot_fp32_a``). ``ONE_CHUNK``: the chunk is all of
    L, so the program writes the final ``slots`` (B, S, C) to ``acc`` and ``lse`` (B, S) to
    ``m``, and no combine runs.
    """
    b, s0 = _batch_and_block(tl.program_id(0), S, BLOCK_S)
    c_out = tl.program_id(2) * BLOCK_C
    l_begin, l_end = _chunk(L, chunk_len)
    row = b * tl.num_programs(1) + tl.program_id(1)
    x_ptr += b * sx_b
    qh_ptr += b * sq_b
    ql_ptr += b * sq_b
    if ONE_C_BLOCK:  # loop-invariant: loaded (or with NORMALIZE made) once
        inv_q, scale = _query_norms_if(NORMALIZE, s0_ptr + b * ss_b, scale_ptr, ss_s, ss_c, s0, S, C, BLOCK_S, BLOCK_C)
        q_hi, q_lo = _query_block(
            qh_ptr, ql_ptr, C, s0_ptr + b * ss_b, ss_s, ss_c, inv_q, scale, s0, 0, S, C, NORMALIZE, SPLIT, BLOCK_S,
            BLOCK_C, x_ptr.dtype.element_ty,
        )  # fmt: skip

    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    tot = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for l0 in tl.range(l_begin, l_end, BLOCK_L, num_stages=NUM_STAGES):
        if ONE_C_BLOCK:
            xt = _load(x_ptr, l0, 0, l_end, C, sx_l, sx_c, BLOCK_L, BLOCK_C)
            xf = xt.to(tl.float32)
            sumsq = tl.sum(xf * xf, 1)
            _, a = _logits_of_tile(q_hi, q_lo, xt, SPLIT, UPCAST)
        else:
            a, sumsq = _tile_logits(
                qh_ptr, ql_ptr, x_ptr, sx_l, sx_c, qh_ptr, 0, 0, 0.0, 0.0, s0, l0, S, l_end, C, False, SPLIT,
                BLOCK_S, BLOCK_L, SCORE_C, UPCAST,
            )  # fmt: skip
            xt = _load(x_ptr, l0, c_out, l_end, C, sx_l, sx_c, BLOCK_L, BLOCK_C)
        a = a * _inv_norm(sumsq)[None, :]
        a = tl.where((l0 + tl.arange(0, BLOCK_L) < l_end)[None, :], a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, 1))  # finite: every tile has a pixel < l_end
        alpha = tl.exp(m - m_new)
        p = tl.exp(a - m_new[:, None])
        tot = tot * alpha + tl.sum(p, 1)
        acc = _dot_fp32_a(p, xt, acc * alpha[:, None], UPCAST)
        m = m_new

    s = s0 + tl.arange(0, BLOCK_S)
    if ONE_CHUNK:
        _store(acc_ptr + row * S * C, acc / tot[:, None], s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)
        if tl.program_id(2) == 0:
            tl.store(m_ptr + row * S + s, m + tl.log(tot), mask=s < S)
    else:
        _store(acc_ptr + row * S * C, acc, s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)
        if tl.program_id(2) == 0:
            tl.store(m_ptr + row * S + s, m, mask=s < S)
            tl.store(l_ptr + row * S + s, tot, mask=s < S)


@triton.jit
def cluster_fwd_tile(
    x_ptr,
    s0_ptr,
    scale_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    S,
    L,
    C,
    sx_b,
    sx_l,
    sx_c,
    ss_b,
    ss_s,
    ss_c,
    ONE_CHUNK: tl.constexpr,
    X_LAYOUT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``cluster_fwd_chunk`` for few pixels and many channels (16-bit x): one program per chunk of
    ``BLOCK_L`` pixels holds all S slots in one tile, computes its logits over ``BLOCK_C``-channel
    steps once, then ``P @ x`` C block by C block. Each S x C operand is read once per program,
    so it makes ``qs_hi``, ``qs_lo`` from ``init_slots`` and ``scale`` itself, as
    ``scaled_queries`` would. Outputs as ``cluster_fwd_chunk``'s; grid (B, chunks).
    """
    b = tl.program_id(0).to(tl.int64)
    l_begin, l_end = _chunk(L, BLOCK_L)
    row = b * tl.num_programs(1) + tl.program_id(1)
    x_ptr += b * sx_b
    s0_ptr += b * ss_b
    inv_q = _query_norms(s0_ptr, ss_s, ss_c, 0, S, C, BLOCK_S, BLOCK_C)
    scale = tl.load(scale_ptr).to(tl.float32)
    a, sumsq = _tile_logits(
        s0_ptr, s0_ptr, x_ptr, sx_l, sx_c, s0_ptr, ss_s, ss_c, inv_q, scale, 0, l_begin, S, l_end, C, True, True,
        BLOCK_S, BLOCK_L, BLOCK_C, UPCAST,
    )  # fmt: skip
    a = a * _inv_norm(sumsq)[None, :]
    a = tl.where((l_begin + tl.arange(0, BLOCK_L) < l_end)[None, :], a, float("-inf"))
    m = tl.max(a, 1)  # finite: every chunk has a pixel
    p = tl.exp(a - m[:, None])
    tot = tl.sum(p, 1)
    for c0 in range(0, C, BLOCK_C):
        xt = _load(x_ptr, l_begin, c0, l_end, C, sx_l, sx_c, BLOCK_L, BLOCK_C)
        acc = _dot_fp32_a(p, xt, None, UPCAST)
        if ONE_CHUNK:
            acc = acc / tot[:, None]
        _store(acc_ptr + row * S * C, acc, 0, c0, S, C, C, 1, BLOCK_S, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    if ONE_CHUNK:
        tl.store(m_ptr + row * S + s, m + tl.log(tot), mask=s < S)
    else:
        tl.store(m_ptr + row * S + s, m, mask=s < S)
        tl.store(l_ptr + row * S + s, tot, mask=s < S)


@triton.jit
def cluster_fwd_combine(
    m_ptr, l_ptr, acc_ptr, slots_ptr, lse_ptr, S, C, n_chunks, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr
):
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
def dispatch_fwd(
    x_ptr,
    qh_ptr,
    ql_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    s0_ptr,
    scale_ptr,
    S,
    L,
    C,
    chunk_len,
    sx_b,
    sx_l,
    sx_c,
    sq_b,
    sv_b,
    sv_s,
    sv_c,
    ss_b,
    ss_s,
    ss_c,
    NORMALIZE: tl.constexpr,
    X_LAYOUT: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Softmax over all S slots for each pixel tile of a chunk, then ``out = D^T @ slots``.

    ``NORMALIZE`` (over several C blocks, where the S x C operands are loaded per pixel tile
    anyway): ``qs_hi``, ``qs_lo`` are made from ``init_slots`` (``s0``) and ``scale`` as
    ``scaled_queries`` makes them, which then does not run. Grid (B, chunks); ``out`` (B, L, C)
    and ``lse`` (B, L) are contiguous.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    l_begin, l_end = _chunk(L, chunk_len)
    x_ptr += b * sx_b
    qh_ptr += b * sq_b
    ql_ptr += b * sq_b
    v_ptr += b * sv_b
    s0_ptr += b * ss_b
    inv_q, scale = _query_norms_if(NORMALIZE, s0_ptr, scale_ptr, ss_s, ss_c, 0, S, C, BLOCK_S, BLOCK_C)
    valid_s = (tl.arange(0, BLOCK_S) < S)[:, None]
    if ONE_C_BLOCK:  # loop-invariant: loaded (or with NORMALIZE made) once
        q_hi, q_lo = _query_block(
            qh_ptr, ql_ptr, C, s0_ptr, ss_s, ss_c, inv_q, scale, 0, 0, S, C, NORMALIZE, SPLIT, BLOCK_S, BLOCK_C, DT
        )
        vt = _load(v_ptr, 0, 0, S, C, sv_s, sv_c, BLOCK_S, BLOCK_C).to(DT)

    for l0 in tl.range(l_begin, l_end, BLOCK_L, num_stages=NUM_STAGES):
        if ONE_C_BLOCK:
            xf = _load(x_ptr, l0, 0, L, C, sx_l, sx_c, BLOCK_L, BLOCK_C)
            _, a = _logits_of_tile(q_hi, q_lo, xf, SPLIT, UPCAST)
            xf = xf.to(tl.float32)
            sumsq = tl.sum(xf * xf, 1)
        else:
            a, sumsq = _tile_logits(
                qh_ptr, ql_ptr, x_ptr, sx_l, sx_c, s0_ptr, ss_s, ss_c, inv_q, scale, 0, l0, S, L, C, NORMALIZE,
                SPLIT, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST,
            )  # fmt: skip
        a = tl.where(valid_s, a * _inv_norm(sumsq)[None, :], float("-inf"))
        m = tl.max(a, 0)
        e = tl.exp(a - m[None, :])
        tot = tl.sum(e, 0)
        d = tl.trans(e / tot[None, :]).to(DT)
        pix = l0 + tl.arange(0, BLOCK_L)
        tl.store(lse_ptr + b * L + pix, m + tl.log(tot), mask=pix < L)
        if ONE_C_BLOCK:
            _store(out_ptr + b * L * C, _dot(d, vt, None, UPCAST), l0, 0, L, C, C, 1, BLOCK_L, BLOCK_C)
        else:
            for c0 in range(0, C, BLOCK_C):
                vc = _load(v_ptr, 0, c0, S, C, sv_s, sv_c, BLOCK_S, BLOCK_C).to(DT)
                _store(out_ptr + b * L * C, _dot(d, vc, None, UPCAST), l0, c0, L, C, C, 1, BLOCK_L, BLOCK_C)


@triton.jit
def _probabilities(a, lse, s0, l0, S, L, BS: tl.constexpr, BL: tl.constexpr):
    """``P = exp(A - lse)`` of one tile of normalised logits; ``lse`` broadcastable to the tile:
    per slot ``(BS, 1)`` for clustering (softmax over L), per pixel ``(1, BL)`` for dispatch
    (softmax over S). Padding rows and columns get ``P = 0`` (and so ``dA = 0``): they add
    nothing to any sum over the tile.
    """
    valid = (s0 + tl.arange(0, BS) < S)[:, None] & (l0 + tl.arange(0, BL) < L)[None, :]
    return tl.where(valid, tl.exp(a - lse), 0.0)


@triton.jit
def _tile_delta(p, dd):
    """Dispatch's ``delta' = sum_s D dD / sum_s D`` over a tile holding all S slots, ``(1, BL)``.

    The sum over the ``D`` recomputed here, not ``rowsum(Hg * out)``: equal only in exact
    arithmetic, and a half-precision forward rounds ``D`` before the value product. The recomputed
    ``D`` sums to 1 only up to ``lse``'s rounding (visible at large temperatures): dividing keeps
    ``sum_s dA = 0`` exactly. Padding pixels have no ``D``: divide by 1 there.
    """
    psum = tl.sum(p, 0)
    return (tl.sum(p * dd, 0) / tl.where(psum > 0, psum, 1.0))[None, :]


@triton.jit
def _key_projection(da, a_hi, sumsq, inv_r):
    """``<K, dK> / r`` per pixel, the part ``_dx_tile`` removes from ``dK = dA^T qs``, for a tile
    that computes ``dK`` a C block at a time (so never holds all of it).

    ``<K, dK> = colsum(dA * A_hi) / r``: that of the ``dK`` the dots compute, from ``dA`` rounded
    to x's dtype and the logits of the rounded ``qs``. The projection then removes the along-K
    part of ``dK``'s operand rounding, which the accurate ``A`` would leave in, amplified by
    ``1/r`` at small ``||x||``. Not its accumulation rounding: this sum is not the dots' sum.
    """
    return _clamped_norm_free(tl.sum(da.to(tl.float32) * a_hi, 0) * inv_r, sumsq)


@triton.jit
def _key_projection_of(dk, xt, sumsq, inv_r):
    """``<K, dK> / r`` per pixel from the ``dK`` the dots returned, all of C held.

    Every rounding of ``dK`` along K then cancels, the dots' fp32 (or tf32x3) accumulation
    included: with C = 1 the key path is all along K and comes out at a few ``eps |dK| / r``, not
    at ``eps sum_s |dA qs| / r`` (terms that cancel: dispatch's dx, zero in exact arithmetic, was
    67x the fp32 tolerance at a pixel of ``r = 6e-4``).
    """
    return _clamped_norm_free(tl.sum(dk * xt.to(tl.float32), 1) * inv_r, sumsq)


@triton.jit
def _clamped_norm_free(kdk, sumsq):
    """F.normalize clamps the norm at eps: below it, ``x / eps`` has no projection term."""
    return tl.where(tl.sqrt(sumsq) >= NORM_EPS, kdk, 0.0)


@triton.jit
def _batch_rows(b, x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr, sx_b, sq_b, sg_b, sv_b):
    """The backward kernels' operands moved to batch element ``b``."""
    return x_ptr + b * sx_b, qh_ptr + b * sq_b, ql_ptr + b * sq_b, g_ptr + b * sg_b, v_ptr + b * sv_b


@triton.jit
def _slot_stats(lse_ptr, delta_ptr, b, s0, S, BS: tl.constexpr):
    """Clustering's per-slot ``lse`` and ``delta`` of slots ``s0..``, as ``(BS, 1)`` columns."""
    s = s0 + tl.arange(0, BS)
    lse = tl.load(lse_ptr + b * S + s, mask=s < S, other=0.0)[:, None]
    return lse, tl.load(delta_ptr + b * S + s, mask=s < S, other=0.0)[:, None]


@triton.jit
def _held_operands(
    qh_ptr,
    ql_ptr,
    g_ptr,
    sg_r,
    sg_c,
    v_ptr,
    sv_s,
    sv_c,
    s0_ptr,
    ss_s,
    ss_c,
    inv_q,
    scale,
    s0,
    S,
    C,
    CLUSTER: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    DT: tl.constexpr,
):
    """The S x C operands a backward program holds across its pixel loop (``ONE_C_BLOCK``):
    ``qs_hi``, ``qs_lo`` (loaded, or made as ``_query_block`` makes them) and the rows of ``dP``
    (clustering's G, dispatch's slots) in x's dtype. Over several C blocks nothing is held:
    unused zeros."""
    if ONE_C_BLOCK:
        q_hi, q_lo = _query_block(
            qh_ptr, ql_ptr, C, s0_ptr, ss_s, ss_c, inv_q, scale, s0, 0, S, C, NORMALIZE, SPLIT, BS, BC, DT
        )
        if CLUSTER:
            yt = _load(g_ptr, s0, 0, S, C, sg_r, sg_c, BS, BC).to(DT)
        else:
            yt = _load(v_ptr, s0, 0, S, C, sv_s, sv_c, BS, BC).to(DT)
    else:
        q_hi = tl.zeros([BS, BC], DT)
        q_lo = q_hi
        yt = q_hi
    return q_hi, q_lo, yt


@triton.jit
def _bwd_scores(
    x_ptr,
    qh_ptr,
    ql_ptr,
    g_ptr,
    v_ptr,
    q_hi,
    q_lo,
    yt,
    s0_ptr,
    ss_s,
    ss_c,
    inv_q,
    scale,
    s0,
    l0,
    S,
    n_l,
    C,
    sx_l,
    sx_c,
    sg_r,
    sg_c,
    sv_s,
    sv_c,
    CLUSTER: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One tile of the backward kernels: ``(A_hi, A, dP, sum of squares of x, x tile, g tile)``,
    the logits before the per-pixel ``1/||x||`` (see ``_scores``) and ``dP`` (clustering
    ``G x^T``, dispatch ``slots Hg^T``) for slots ``s0..`` and pixels ``l0..`` (of ``n_l``).
    With ``ONE_C_BLOCK`` from the held operands and one x (and Hg) tile over all of C, which are
    returned for the value products; else over ``BC``-channel steps, and the tiles are zeros."""
    if ONE_C_BLOCK:
        xt = _load(x_ptr, l0, 0, n_l, C, sx_l, sx_c, BL, BC)
        a_hi, a = _logits_of_tile(q_hi, q_lo, xt, SPLIT, UPCAST)
        xf = xt.to(tl.float32)
        sumsq = tl.sum(xf * xf, 1)
        if CLUSTER:
            gt = xt  # no Hg: any tile
            dp = _dot(yt, tl.trans(xt), None, UPCAST)
        else:
            gt = _load(g_ptr, l0, 0, n_l, C, sg_r, sg_c, BL, BC)
            dp = _dot(yt, tl.trans(gt), None, UPCAST)
    else:
        if CLUSTER:
            y_ptr, sy_r, sy_c = g_ptr, sg_r, sg_c
        else:
            y_ptr, sy_r, sy_c = v_ptr, sv_s, sv_c
        a_hi, a, dp, sumsq = _scores(
            qh_ptr,
            ql_ptr,
            C,
            s0_ptr,
            ss_s,
            ss_c,
            inv_q,
            scale,
            x_ptr,
            sx_l,
            sx_c,
            y_ptr,
            sy_r,
            sy_c,
            g_ptr,
            sg_r,
            sg_c,
            s0,
            l0,
            S,
            n_l,
            C,
            SCORE_ROWS_X if CLUSTER else SCORE_ROWS_G,
            NORMALIZE,
            SPLIT,
            BS,
            BL,
            BC,
            UPCAST,
        )
        xt = tl.zeros([BL, BC], x_ptr.dtype.element_ty)
        gt = xt
    return a_hi, a, dp, sumsq, xt, gt


@triton.jit
def _dx_tile(
    dx_ptr,
    dq_ptr,
    dv_ptr,
    x_ptr,
    qh_ptr,
    g_ptr,
    q_hi,
    yt,
    xt,
    da32,
    da,
    p,
    inv_r,
    a_hi,
    sumsq,
    inv_n,
    s0_ptr,
    ss_s,
    ss_c,
    inv_q,
    scale,
    l0,
    S,
    L,
    C,
    sx_l,
    sx_c,
    sg_r,
    sg_c,
    CLUSTER: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    SLOT_SUMS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Stores ``dx = [P^T G] + (dK - K <K, dK>) / r`` of one pixel tile, ``dK = dA^T qs`` (the
    ``dA``, ``P`` of all S slots in x's dtype), from the held operands or per C block.

    Per C block with ``SLOT_SUMS`` (the tile is the whole chunk): also the chunk's sums ``dqs``
    (from the fp32 ``dA``; clustering's centred, ``inv_n`` as ``_key_mean`` takes it) and
    dispatch's ``dslots = D @ Hg``, stored to ``dq_ptr``, ``dv_ptr``
    from the x (and Hg) block the ``dx`` block loads anyway."""
    if ONE_C_BLOCK:
        dk = _dot(tl.trans(da), q_hi, None, UPCAST)
        ck = (inv_r * _key_projection_of(dk, xt, sumsq, inv_r))[:, None]
        dx = (dk - xt.to(tl.float32) * ck) * inv_r[:, None]
        if CLUSTER:
            dx = _dot(tl.trans(p), yt, dx, UPCAST)
        _store(dx_ptr, dx, l0, 0, L, C, C, 1, BL, BC)
    else:
        ck = (inv_r * _key_projection(da, a_hi, sumsq, inv_r))[:, None]
        for c0 in range(0, C, BC):
            qt, _ = _query_block(
                qh_ptr, qh_ptr, C, s0_ptr, ss_s, ss_c, inv_q, scale, 0, c0, S, C, NORMALIZE, False, BS, BC, da.dtype
            )
            xc = _load(x_ptr, l0, c0, L, C, sx_l, sx_c, BL, BC)
            dx = (_dot(tl.trans(da), qt, None, UPCAST) - xc.to(tl.float32) * ck) * inv_r[:, None]
            if CLUSTER:
                gt = _load(g_ptr, 0, c0, S, C, sg_r, sg_c, BS, BC).to(p.dtype)
                dx = _dot(tl.trans(p), gt, dx, UPCAST)
            _store(dx_ptr, dx, l0, c0, L, C, C, 1, BL, BC)
            if SLOT_SUMS:
                dq = _dq_product(da32, inv_r, xc, None, UPCAST)
                if CLUSTER:
                    dq = _centred_dqs(dq, tl.sum(da32, 1), _key_mean(x_ptr, inv_n, L, c0, C, sx_l, sx_c, BC))
                _store(dq_ptr, dq, 0, c0, S, C, C, 1, BS, BC)
                if not CLUSTER:
                    hg = _load(g_ptr, l0, c0, L, C, sg_r, sg_c, BL, BC)
                    _store(dv_ptr, _dot(p, hg.to(p.dtype), None, UPCAST), 0, c0, S, C, C, 1, BS, BC)


@triton.jit
def pixel_bwd(
    x_ptr,
    qh_ptr,
    ql_ptr,
    g_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    dx_ptr,
    dq_ptr,
    dv_ptr,
    s0_ptr,
    scale_ptr,
    S,
    L,
    C,
    chunk_len,
    sx_b,
    sx_l,
    sx_c,
    sq_b,
    sg_b,
    sg_r,
    sg_c,
    sv_b,
    sv_s,
    sv_c,
    ss_b,
    ss_s,
    ss_c,
    CLUSTER: tl.constexpr,
    SLOT_SUMS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    X_LAYOUT: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``dx`` for each pixel tile of a chunk, all S slots in the tile (``dx`` is local per pixel).

    ``g``: the incoming gradient (clustering ``G`` (B, S, C), dispatch ``Hg`` (B, L, C)); ``v``:
    the (B, S, C) slots (clustering's fp32 forward result, dispatch's values).
    ``dx = [P^T G] + (dK - K <K, dK>) / r`` with ``dK = dA^T qs``. ``delta``: clustering reads
    the (B, S) ``rowsum(G * slots)`` of ``scaled_queries``; dispatch writes its (B, L)
    ``delta' = sum_s D dD`` there for ``slot_bwd``, whose slot blocks may hold only some slots.
    ``SLOT_SUMS``: also this chunk's partial sums of ``dqs`` (and ``dslots``), as ``slot_bwd``
    would write them; then no ``slot_bwd`` runs, and neither the logits nor ``x`` are read a
    second time. With ``ONE_C_BLOCK`` they are accumulated over the chunk's tiles; over several
    C blocks the chunk is one tile (at most ``BLOCK_L`` pixels, small L), whose sums go out per C
    block beside ``dx``. ``NORMALIZE`` (the launcher sets it with ``SLOT_SUMS``): ``qs_hi``,
    ``qs_lo`` are made from ``init_slots`` (``s0``) and ``scale`` as ``scaled_queries`` makes
    them, and clustering's ``delta`` is computed here, so no ``scaled_queries`` runs before.
    Clustering's ``dqs`` sums are centred on the sampled keys' mean (``_centred_dqs``).
    Grid (B, chunks); ``dx`` is contiguous.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    l_begin, l_end = _chunk(L, chunk_len)
    row = b * tl.num_programs(1) + tl.program_id(1)  # this chunk's partial sums (SLOT_SUMS)
    x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr = _batch_rows(b, x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr, sx_b, sq_b, sg_b, sv_b)
    # Each S x C operand is read once per program: normalising here (NORMALIZE) costs little.
    s0_ptr += b * ss_b
    inv_q, scale = _query_norms_if(NORMALIZE, s0_ptr, scale_ptr, ss_s, ss_c, 0, S, C, BLOCK_S, BLOCK_C)
    if CLUSTER:  # per slot, for every tile
        s = tl.arange(0, BLOCK_S)
        lse = tl.load(lse_ptr + b * S + s, mask=s < S, other=0.0)[:, None]
        if NORMALIZE:
            delta = _delta_rows(g_ptr, sg_r, sg_c, v_ptr, sv_s, sv_c, 0, S, C, BLOCK_S, BLOCK_C)[:, None]
        else:
            delta = tl.load(delta_ptr + b * S + s, mask=s < S, other=0.0)[:, None]
    q_hi, q_lo, yt = _held_operands(
        qh_ptr, ql_ptr, g_ptr, sg_r, sg_c, v_ptr, sv_s, sv_c, s0_ptr, ss_s, ss_c, inv_q, scale, 0, S, C, CLUSTER,
        ONE_C_BLOCK, NORMALIZE, SPLIT, BLOCK_S, BLOCK_C, DT,
    )  # fmt: skip
    if SLOT_SUMS:
        dq = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        da_sum = tl.zeros([BLOCK_S], tl.float32)  # clustering's, for the centred dqs

    for l0 in tl.range(l_begin, l_end, BLOCK_L, num_stages=NUM_STAGES):
        pix = l0 + tl.arange(0, BLOCK_L)
        if not CLUSTER:
            lse = tl.load(lse_ptr + b * L + pix, mask=pix < L, other=0.0)[None, :]
        a_hi, a, dp, sumsq, xt, gt = _bwd_scores(
            x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr, q_hi, q_lo, yt, s0_ptr, ss_s, ss_c, inv_q, scale, 0, l0, S, L, C,
            sx_l, sx_c, sg_r, sg_c, sv_s, sv_c, CLUSTER, ONE_C_BLOCK, NORMALIZE, SPLIT, BLOCK_S, BLOCK_L, BLOCK_C,
            UPCAST,
        )  # fmt: skip
        inv_r = _inv_norm(sumsq)
        p = _probabilities(a * inv_r[None, :], lse, 0, l0, S, L, BLOCK_S, BLOCK_L)
        if CLUSTER:
            da32 = p * (dp - delta)
        else:
            delta_l = _tile_delta(p, dp)
            if not SLOT_SUMS:
                tl.store(delta_ptr + b * L + pix[None, :], delta_l, mask=(pix < L)[None, :])
            da32 = p * (dp - delta_l)
        da = da32.to(DT)
        if SLOT_SUMS and ONE_C_BLOCK:
            dq = _dq_product(da32, inv_r, xt, dq, UPCAST)
            if CLUSTER:
                da_sum += tl.sum(da32, 1)
            else:
                dv = _dot(p.to(DT), gt, dv, UPCAST)
        # Over C blocks the tile is the chunk: its C blocks' dqs sums are centred as they go out.
        inv_n = _centring_norms(x_ptr, L, C, sx_l, sx_c, CLUSTER and SLOT_SUMS and not ONE_C_BLOCK, BLOCK_C)
        _dx_tile(
            dx_ptr + b * L * C, dq_ptr + row * S * C, dv_ptr + row * S * C, x_ptr, qh_ptr, g_ptr, q_hi, yt, xt,
            da32, da, p.to(DT), inv_r, a_hi, sumsq, inv_n, s0_ptr, ss_s, ss_c, inv_q, scale, l0, S, L, C, sx_l, sx_c,
            sg_r, sg_c, CLUSTER, ONE_C_BLOCK, SLOT_SUMS, NORMALIZE, BLOCK_S, BLOCK_L, BLOCK_C, UPCAST,
        )  # fmt: skip
    if SLOT_SUMS and ONE_C_BLOCK:
        if CLUSTER:
            dq = _centred_dqs(dq, da_sum, _key_mean_of(x_ptr, L, 0, C, sx_l, sx_c, BLOCK_C, BLOCK_C))
        _store(dq_ptr + row * S * C, dq, 0, 0, S, C, C, 1, BLOCK_S, BLOCK_C)
        if not CLUSTER:
            _store(dv_ptr + row * S * C, dv, 0, 0, S, C, C, 1, BLOCK_S, BLOCK_C)


@triton.jit
def _dq_product(da, inv_r, xt, acc, UPCAST: tl.constexpr):
    """``acc + (dA / r) @ x`` as ``(dA * m) @ (x * 2**e)`` with ``1/r = m * 2**e``: the power-of-two
    scaling is exact in x's dtype and keeps ``|x * 2**e| <= 1``, where ``dA / r`` would overflow
    fp16 at tiny norms."""
    pow2 = (inv_r.to(tl.int32, bitcast=True) & FP32_EXPONENT_BITS).to(tl.float32, bitcast=True)
    xs = (xt.to(tl.float32) * pow2[:, None]).to(xt.dtype)
    return _dot_fp32_a(da * (inv_r / pow2)[None, :], xs, acc, UPCAST)


@triton.jit
def slot_bwd(
    x_ptr,
    qh_ptr,
    ql_ptr,
    g_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dv_ptr,
    S,
    L,
    C,
    chunk_len,
    sx_b,
    sx_l,
    sx_c,
    sq_b,
    sg_b,
    sg_r,
    sg_c,
    sv_b,
    sv_s,
    sv_c,
    CLUSTER: tl.constexpr,
    X_LAYOUT: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_C_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SCORE_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One L chunk's share of the sums over pixels: ``dqs = dA @ K``, and for dispatch
    ``dslots = D @ Hg``, for a block of slots and one C block.

    Arguments as in ``pixel_bwd``; ``delta`` is clustering's (B, S) or dispatch's (B, L) one; C
    blocks and ``SCORE_C`` as in ``cluster_fwd_chunk``; clustering's ``dqs`` centred
    (``_centred_dqs``). Grid (B * slot blocks, chunks, C blocks);
    partials go to contiguous fp32 workspaces ``(B, chunks, S, C)`` that ``query_bwd`` and
    ``sum_chunks`` reduce.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, s0 = _batch_and_block(tl.program_id(0), S, BLOCK_S)
    c_out = tl.program_id(2) * BLOCK_C
    l_begin, l_end = _chunk(L, chunk_len)
    row = b * tl.num_programs(1) + tl.program_id(1)
    x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr = _batch_rows(b, x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr, sx_b, sq_b, sg_b, sv_b)
    if CLUSTER:
        lse, delta = _slot_stats(lse_ptr, delta_ptr, b, s0, S, BLOCK_S)
        da_sum = tl.zeros([BLOCK_S], tl.float32)
    q_hi, q_lo, yt = _held_operands(
        qh_ptr, ql_ptr, g_ptr, sg_r, sg_c, v_ptr, sv_s, sv_c, qh_ptr, 0, 0, 0.0, 0.0, s0, S, C, CLUSTER, ONE_C_BLOCK,
        False, SPLIT, BLOCK_S, BLOCK_C, DT,
    )  # fmt: skip

    dq = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for l0 in tl.range(l_begin, l_end, BLOCK_L, num_stages=NUM_STAGES):
        pix = l0 + tl.arange(0, BLOCK_L)
        if not CLUSTER:
            lse = tl.load(lse_ptr + b * L + pix, mask=pix < l_end, other=0.0)[None, :]
            delta = tl.load(delta_ptr + b * L + pix, mask=pix < l_end, other=0.0)[None, :]
        _, a, dp, sumsq, xt, gt = _bwd_scores(
            x_ptr, qh_ptr, ql_ptr, g_ptr, v_ptr, q_hi, q_lo, yt, qh_ptr, 0, 0, 0.0, 0.0, s0, l0, S, l_end, C,
            sx_l, sx_c, sg_r, sg_c, sv_s, sv_c, CLUSTER, ONE_C_BLOCK, False, SPLIT, BLOCK_S, BLOCK_L, SCORE_C, UPCAST,
        )  # fmt: skip
        if not ONE_C_BLOCK:  # this program's C block of the value tiles
            xt = _load(x_ptr, l0, c_out, l_end, C, sx_l, sx_c, BLOCK_L, BLOCK_C)
            if not CLUSTER:
                gt = _load(g_ptr, l0, c_out, l_end, C, sg_r, sg_c, BLOCK_L, BLOCK_C)
        inv_r = _inv_norm(sumsq)
        p = _probabilities(a * inv_r[None, :], lse, s0, l0, S, l_end, BLOCK_S, BLOCK_L)
        da = p * (dp - delta)
        if not CLUSTER:
            dv = _dot(p.to(DT), gt.to(DT), dv, UPCAST)
        dq = _dq_product(da, inv_r, xt, dq, UPCAST)
        if CLUSTER:
            da_sum += tl.sum(da, 1)

    if CLUSTER:
        dq = _centred_dqs(dq, da_sum, _key_mean_of(x_ptr, L, c_out, C, sx_l, sx_c, BLOCK_C, SCORE_C))
    _store(dq_ptr + row * S * C, dq, s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)
    if not CLUSTER:
        _store(dv_ptr + row * S * C, dv, s0, c_out, S, C, C, 1, BLOCK_S, BLOCK_C)


@triton.jit
def _query_mean(s0_ptr, S, C, ss_s, ss_c, BLOCK_C: tl.constexpr, ROWS: tl.constexpr = 8):
    """The mean of the ``S`` queries ``q = n(init_slots)`` (all of C in ``BLOCK_C``), in fp64,
    ``ROWS`` slots at a time: small tiles, beside what ``query_bwd`` holds."""
    m = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, S, ROWS):
        v = _load(s0_ptr, t0, 0, S, C, ss_s, ss_c, ROWS, BLOCK_C).to(tl.float64)
        m += tl.sum(v / tl.maximum(tl.sqrt(tl.sum(v * v, 1)), NORM_EPS)[:, None], 0)
    return m / S


@triton.jit
def query_bwd(
    dq_ptr,
    s0_ptr,
    scale_ptr,
    d_init_ptr,
    dscale_ptr,
    S,
    C,
    n_rows,
    ss_b,
    ss_s,
    ss_c,
    CENTRE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``d_init_slots`` for a block of slots (all of C in one tile), and this program's share of
    ``dscale``.

    ``dqs`` is the chunk-ordered sum of ``n_rows`` partials (a broadcast ``init_slots``: every
    batch element's chunks). With ``dq = scale * dqs`` and ``q`` recomputed in fp64:
    ``d_init_slots = (dq - q <q, dq>) / r`` (``dq / eps`` for a norm below eps, as F.normalize),
    the terms cancel and ``1/r`` amplifies them, hence fp64; ``dscale = sum(dqs * q)``, with
    ``CENTRE`` (dispatch: ``dqs`` sums to zero over the slots) ``sum(dqs * (q - m))`` for ``m``
    the queries' mean, equal in exact arithmetic (math.md#centred-dscale), as
    ``sum(dqs * q) - <sum_s dqs_s, m>`` in fp64.
    Grid (batch of init_slots x slot blocks,); ``d_init_slots`` is contiguous, the dscale parts
    are fp64, one per program, summed in order by ``sum_chunks``.
    """
    b, s0 = _batch_and_block(tl.program_id(0), S, BLOCK_S)
    dqs = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for k in range(0, n_rows):
        dqs += _load(dq_ptr + (b * n_rows + k) * S * C, s0, 0, S, C, C, 1, BLOCK_S, BLOCK_C)
    dqs = dqs.to(tl.float64)
    v = _load(s0_ptr + b * ss_b, s0, 0, S, C, ss_s, ss_c, BLOCK_S, BLOCK_C).to(tl.float64)
    norm = tl.sqrt(tl.sum(v * v, 1))
    inv_r = 1.0 / tl.maximum(norm, NORM_EPS)
    q = v * inv_r[:, None]
    dq = tl.load(scale_ptr).to(tl.float64) * dqs
    proj = tl.where(norm >= NORM_EPS, tl.sum(q * dq, 1), 0.0)
    d_init = ((dq - q * proj[:, None]) * inv_r[:, None]).to(tl.float32)  # the interpreter has no fp64 -> bf16
    _store(d_init_ptr + b * S * C, d_init, s0, 0, S, C, C, 1, BLOCK_S, BLOCK_C)
    dscale = tl.sum(tl.sum(dqs * q.to(tl.float32).to(tl.float64), 1), 0)
    if CENTRE:  # less <sum_s dqs_s, m>, in fp64: after the tiles, which are dead by then
        dscale -= tl.sum(tl.sum(dqs, 0) * _query_mean(s0_ptr + b * ss_b, S, C, ss_s, ss_c, BLOCK_C), 0)
    tl.store(dscale_ptr + tl.program_id(0), dscale)


@triton.jit
def sum_chunks(ws_ptr, out_ptr, n_chunks, N, BLOCK: tl.constexpr):
    """``out[b] = sum_k ws[b, k]`` over ``(B, chunks, N)``, in chunk order (bitwise deterministic),
    accumulated in the workspace's dtype.

    Grid (B * blocks of N,); ``out`` (B, N) contiguous.
    """
    b, i0 = _batch_and_block(tl.program_id(0), N, BLOCK)
    i = i0 + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ws_ptr.dtype.element_ty)
    for k in range(0, n_chunks):
        acc += tl.load(ws_ptr + (b * n_chunks + k) * N + i, mask=i < N, other=0.0)
    # Through fp32: the interpreter has no fp64 -> bf16 (dscale in a bf16 scale's dtype).
    tl.store(out_ptr + b * N + i, acc.to(tl.float32).to(out_ptr.dtype.element_ty), mask=i < N)
