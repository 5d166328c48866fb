"""Predicted HBM bytes, L2 bytes, tensor-core work and time of the Triton kernels, per kernel, at
glnet_4g stages (B=128, S=64, bf16, per-batch pooled init_slots), for the kernels as they are
("after"), as they were before clustering's ``dqs`` was centred on a sample of keys ("own qs"),
before every kernel holding all of C made ``qs`` itself ("one-tile"),
before the one-tile kernels ("previous") and before the rework ("before"); prints the markdown
tables of docs/performance.md.

    python scripts/triton_traffic_model.py

A model, not a measurement: each kernel takes the longest of its HBM bytes at ``HBM_EFFICIENCY``
of the peak bandwidth, its L2 bytes at the L2 bandwidth and its tensor-core work at half the
dense peak, and at least ``MIN_KERNEL_US`` (a launch). The tile sizes and chunk counts come from
the backend's own ``pick_config`` and ``plan_chunks`` for a 132-SM H100.
"""

import math
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from glmix_kernels.backends import triton as tb  # noqa: E402

HBM_BW = 3.35e12  # H100 SXM, bytes/s
HBM_EFFICIENCY = 0.85  # the share of it a streaming kernel reaches
L2_BW = 5.5e12  # H100 L2 read bandwidth, bytes/s (microbenchmarks)
TC_FLOPS = 0.5 * 989e12  # half the dense bf16 peak: small tiles
MIN_KERNEL_US = 2.5
SM_COUNT = 132
B, S = 128, 64
E = 2  # bytes per bf16
STAGES = {"stage 1": (64, 3136), "stage 3": (256, 196), "stage 4": (512, 49)}
# Which kernels: 1 "previous"; 2 "one-tile": the one-tile kernels and dispatch_fwd making qs
# itself over C blocks; 3 "own qs": also qs made by every kernel holding all of C; 4 "after": also
# clustering's dqs centred on the mean key of N_SAMPLE pixels (no product more: L2 reads only).
GENERATION = 4
N_SAMPLE = 32


def floor_bytes(L, C):
    """Each op's inputs read once, outputs written once (contract dtypes), per op."""
    x, sc, s32 = B * L * C * E, B * S * C * E, B * S * C * 4
    return {
        "cluster_fwd": x + sc + s32 + B * S * 4,
        "dispatch_fwd": 2 * x + 2 * sc + B * L * 4,
        "cluster_bwd": 2 * x + 2 * sc + s32 + B * S * 4,
        "dispatch_bwd": 3 * x + 3 * sc + B * L * 4 + sc,
    }


def _us(hbm, l2=0.0, macs=0.0):
    t = max(hbm / (HBM_EFFICIENCY * HBM_BW), l2 / L2_BW, 2 * macs / TC_FLOPS) * 1e6
    return max(t, MIN_KERNEL_US)


def _plan(kernel, L, C):
    tb._programs_wanted = lambda device: 2 * SM_COUNT
    cfg = tb.pick_config(kernel, S, C, torch.bfloat16, L)
    block_s = cfg.block_s if kernel in tb.SPLIT_L_KERNELS else None
    _, n_chunks = tb.plan_chunks(B, S, L, torch.device("cuda"), block_s)
    if cfg.one_tile:  # a chunk is one tile
        n_chunks = math.ceil(L / cfg.block_l)
    return cfg, n_chunks, math.ceil(S / cfg.block_s), math.ceil(C / cfg.block_c)


def _held(cfg, cb):
    """Whether a split-L kernel holds its S x C operands across the pixel loop (one C block, no
    logits steps)."""
    return cb == 1 and not getattr(cfg, "score_c", 0)


def after(L, C):
    """{op: [(kernel, hbm, l2, macs)]} of the reworked kernels. HBM bytes include the S x C
    operands a kernel reads (``qs_hi``, ``qs_lo``, G or the slots) once per batch element."""
    model = _after(L, C)
    if GENERATION >= 4:
        _sampled_keys(model, L, C)
    return model


def _sampled_keys(model, L, C):
    """Clustering's backward kernel that sums ``dqs`` reads ``N_SAMPLE`` pixels twice per program
    (their norms, then the C block it centres), from L2: ``pixel_bwd`` per chunk (one C block, or
    one tile per chunk over all C blocks), else ``slot_bwd`` per slot block, chunk and C block."""
    kernels = model["cluster_bwd"]
    names = [k[0] for k in kernels]
    kernel = "slot_bwd" if "slot_bwd" in names else "pixel_bwd"
    cfg, n_chunks, sb, cb = _plan(kernel, L, C)
    per_program = C + min(C, cfg.block_c)  # channels read per sampled pixel
    if kernel == "pixel_bwd":
        sb, cb, per_program = 1, 1, 2 * C
    i = names.index(kernel)
    name, hbm, l2, macs = kernels[i]
    kernels[i] = (name, hbm, l2 + B * n_chunks * sb * cb * N_SAMPLE * per_program * E, macs)


def _after(L, C):
    x, sc, s32, slc = B * L * C * E, B * S * C * E, B * S * C * 4, B * S * L * C
    ws = lambda n: B * n * S * C * 4  # noqa: E731  a (B, chunks, S, C) fp32 workspace
    q_fwd = ("scaled_queries", sc + 2 * sc, 0, 0)
    own_qs = GENERATION >= 3  # a kernel holding all of C makes qs itself
    ops = 3 * sc  # the S x C operands of every main kernel: qs_hi, qs_lo and G or the slots
    cf, cf_chunks, cf_sb, cf_cb = _plan("cluster_fwd_chunk", L, C)
    df, df_chunks, _, df_cb = _plan("dispatch_fwd", L, C)
    pb, pb_chunks, _, pb_cb = _plan("pixel_bwd", L, C)
    sb, sb_chunks, sb_sb, sb_cb = _plan("slot_bwd", L, C)

    def operands(n_programs, n_tiles, cb, per_tile):  # S x C operands from L2: hoisted or per tile
        return (n_programs if cb == 1 else n_tiles) * per_tile

    def split_l_x(cfg, sb, cb):
        """Reads of x (per x) by a split-L kernel's slot and C blocks: with the operands held,
        once; else once per C block for the logits, plus the value tiles (once over the C blocks)."""
        return sb if _held(cfg, cb) else sb * (cb + 1)

    def split_l_operands(cfg, n_chunks, sb, cb, k):  # k S x C operands, per program or per tile
        held = _held(cfg, cb)
        return operands(B * n_chunks * sb, B * L / cfg.block_l * sb * cb, 1 if held else 2, k * cfg.block_s * C * E)

    fwd_chunk_l2 = x * split_l_x(cf, cf_sb, cf_cb) + split_l_operands(cf, cf_chunks, cf_sb, cf_cb, 2)
    # MACs: logits (qs_hi and qs_lo) once per C block, the value product (P in two parts) once.
    fwd_chunk_macs = 2 * slc * cf_cb + 2 * slc

    def pix(cfg, n, cb, k, k_looped, x_again):
        """L2 bytes of a pixel kernel: ``k`` S x C operands loaded once per program when held,
        else ``k_looped`` per pixel tile (the logits loop and the value loop each load theirs),
        and with ``x_again`` x read a second time by the value loop."""
        tiles = B * L / cfg.block_l
        return x * x_again * (cb > 1) + operands(B * n, tiles, cb, (k if cb == 1 else k_looped) * S * C * E)

    slot_l2 = lambda k_x: (  # noqa: E731
        k_x * x * split_l_x(sb, sb_sb, sb_cb) + split_l_operands(sb, sb_chunks, sb_sb, sb_cb, 3)
    )
    # Logits (two parts) and dP once per C block; dqs (two parts) and dslots once.
    slot_macs = lambda k_v: 3 * slc * sb_cb + (2 + k_v) * slc  # noqa: E731
    fused = pb_cb == 1  # pixel_bwd sums the slot partials itself; no slot_bwd
    model = {
        "cluster_fwd": [
            q_fwd,
            ("cluster_fwd_chunk", x + 2 * sc + ws(cf_chunks), fwd_chunk_l2, fwd_chunk_macs),
            ("cluster_fwd_combine", ws(cf_chunks) + s32, 0, 0),
        ],
        "dispatch_fwd": [
            q_fwd,
            ("dispatch_fwd", 2 * x + ops + B * L * 4, pix(df, df_chunks, df_cb, 3, 3, False), 3 * slc),
        ],
        "cluster_bwd": [
            ("scaled_queries", 2 * sc + s32 + 3 * sc, 0, 0),
            ("pixel_bwd", 2 * x + ops + B * S * 8, pix(pb, pb_chunks, pb_cb, 3, 5, True), 5 * slc),
            ("slot_bwd", x + ops + ws(sb_chunks), slot_l2(1), slot_macs(0)),
            ("query_bwd", ws(sb_chunks) + 2 * sc, 0, 0),
            ("sum_chunks #dscale", 0, 0, 0),
        ],
        "dispatch_bwd": [
            q_fwd,
            ("pixel_bwd", 3 * x + ops + B * L * 8, pix(pb, pb_chunks, pb_cb, 3, 4, True), 4 * slc),
            ("slot_bwd", 2 * x + ops + 2 * ws(sb_chunks), slot_l2(2), slot_macs(1)),
            ("query_bwd", ws(sb_chunks) + 2 * sc, 0, 0),
            ("sum_chunks #dscale", 0, 0, 0),
            ("sum_chunks", ws(sb_chunks) + sc, 0, 0),
        ],
    }
    if cf_chunks == 1:  # the chunk kernel writes slots and lse: no workspace, no combine
        model["cluster_fwd"][1:] = [("cluster_fwd_chunk", x + 2 * sc + s32, fwd_chunk_l2, fwd_chunk_macs)]
    if own_qs and _held(cf, cf_cb):  # init_slots (read twice per program) for qs_hi and qs_lo
        model["cluster_fwd"] = [
            (k, h - sc if k == "cluster_fwd_chunk" else h, l, m) for k, h, l, m in model["cluster_fwd"][1:]
        ]
    if own_qs and df_cb == 1:  # the same for dispatch_fwd
        name, hbm, l2, macs = model["dispatch_fwd"][1]
        model["dispatch_fwd"] = [(name, hbm - sc, l2, macs)]
    tile = tb.pick_config("cluster_fwd_tile", S, C, torch.bfloat16, L) if cf.score_c and GENERATION >= 2 else None
    if tile:
        # One program per chunk holds all slots: init_slots read for its norms (HBM) and by the
        # logits loop (L2), x by the logits loop (HBM) and the value loop (L2); no scaled_queries.
        n = math.ceil(L / tile.block_l)
        l2 = x + (2 * n - 1) * sc
        macs = 4 * slc
        if n == 1:
            model["cluster_fwd"] = [("cluster_fwd_tile", x + sc + s32 + B * S * 4, l2, macs)]
        else:
            model["cluster_fwd"] = [
                ("cluster_fwd_tile", x + sc + ws(n), l2, macs),
                ("cluster_fwd_combine", ws(n) + s32, 0, 0),
            ]
    if df_cb > 1 and GENERATION >= 2:
        # dispatch_fwd makes qs from init_slots (read from HBM once, then per pixel tile from L2
        # with the slots): no scaled_queries.
        l2 = pix(df, df_chunks, df_cb, 2, 2, False)
        model["dispatch_fwd"] = [("dispatch_fwd", 2 * x + 2 * sc + B * L * 4, l2, 3 * slc)]
    if pb.one_tile:
        return _one_tile_backward(model, L, C, pb_chunks)
    if (pb_chunks if fused else sb_chunks) == 1:  # dslots written directly: no chunk sum
        kernels = model["dispatch_bwd"]
        kernels.pop()
        name, hbm, l2, macs = kernels[2]
        kernels[2] = (name, hbm - ws(sb_chunks) + sc, l2, macs)
    if fused:
        for op, k_ws in (("cluster_bwd", 1), ("dispatch_bwd", 2)):
            kernels = model[op]
            name, hbm, l2, macs = kernels[1]
            slot = kernels.pop(2)
            kernels[1] = (name, hbm + k_ws * ws(pb_chunks), l2, macs + 2 * slc + (k_ws - 1) * slc)
            assert slot[0] == "slot_bwd"
    if fused and own_qs:
        _own_qs_backward(model, L, C, pb_chunks)
    return model


def _own_qs_backward(model, L, C, n):
    """The fused backward at stage 1 once ``pixel_bwd`` makes ``qs`` (and clustering's ``delta``)
    itself: no ``scaled_queries``. Per program it reads ``init_slots`` (twice: the norms, the
    held block) instead of ``qs_hi`` and ``qs_lo``, and clustering's G twice (``delta``, the
    held block) and the fp32 slots once; the first read of each per batch element from HBM."""
    sc, s32 = B * S * C * E, B * S * C * 4
    for op, k in (("cluster_bwd", 6), ("dispatch_bwd", 3)):  # S x C operand reads per program, in E bytes
        kernels = [kernel for kernel in model[op] if kernel[0] != "scaled_queries"]
        name, hbm, l2, macs = kernels[0]
        assert name == "pixel_bwd"
        # qs_hi, qs_lo (and delta) no more; init_slots (and the fp32 slots) instead
        hbm += -sc + (s32 - B * S * 4 if op == "cluster_bwd" else 0)
        kernels[0] = (name, hbm, B * n * k * S * C * E, macs)
        model[op] = kernels


def _one_tile_backward(model, L, C, n):
    """The backward where ``pixel_bwd`` runs one tile of all S slots per chunk (``n`` of them) over
    C blocks, writes the slot sums itself, and makes ``qs`` from ``init_slots`` itself (and
    clustering's ``delta``): no ``scaled_queries``, no ``slot_bwd``. Each program reads
    ``init_slots`` three times (its norms, the logits loop, the dx loop), G three times
    (clustering: ``delta``, ``dP``, ``P^T G``) and the fp32 slots once, or the slots once
    (dispatch), x and Hg twice; HBM serves the first read of each per batch element, L2 the rest."""
    x, sc, s32, slc = B * L * C * E, B * S * C * E, B * S * C * 4, B * S * L * C
    ws = B * n * S * C * 4
    query = ("query_bwd", ws + 2 * sc, 0, 0)
    # logits (2), dP, dK, dqs (2) and clustering's P^T G or dispatch's D @ Hg
    macs = 7 * slc
    # dslots written directly with one chunk (else partials and a chunk sum)
    dv = sc if n == 1 else ws
    model["cluster_bwd"] = [
        ("pixel_bwd", 2 * x + 2 * sc + s32 + B * S * 4 + ws, x + 2 * (3 * n - 1) * sc + (n - 1) * s32, macs),
        query,
        ("sum_chunks #dscale", 0, 0, 0),
    ]
    model["dispatch_bwd"] = [
        ("pixel_bwd", 3 * x + 2 * sc + B * L * 4 + ws + dv, 2 * x + (3 * n - 1 + n - 1) * sc, macs),
        query,
        ("sum_chunks #dscale", 0, 0, 0),
    ] + ([("sum_chunks", ws + sc, 0, 0)] if n > 1 else [])
    return model


def previous(L, C):
    """``after`` as the kernels were before the one-tile ``pixel_bwd`` (``slot_bwd`` at stages 3-4)
    and ``cluster_fwd_tile``, and before ``dispatch_fwd`` made ``qs`` itself."""
    saved = tb._one_tile_config
    tb._one_tile_config = lambda *args: None
    try:
        return _generation(1, L, C)
    finally:
        tb._one_tile_config = saved


def one_tile(L, C):
    """``after`` as the kernels were with the one-tile kernels, before the kernels holding all of
    C made ``qs`` themselves."""
    return _generation(2, L, C)


def own_qs(L, C):
    """``after`` as the kernels were before clustering's ``dqs`` was centred."""
    return _generation(3, L, C)


def _generation(generation, L, C):
    global GENERATION
    GENERATION = generation
    try:
        return after(L, C)
    finally:
        GENERATION = 4


def before(L, C):
    """The same for the kernels before the rework (commit f77d2f9): fp32 ``qs`` built by about
    eight PyTorch launches per op and direction, S x C operands reloaded per pixel tile, clustering's
    delta recomputed by every program, one tile per pixel program (BLOCK_L 32, BLOCK_C 64)."""
    x, sc, s32, slc = B * L * C * E, B * S * C * E, B * S * C * 4, B * S * L * C
    q32 = s32  # qs in fp32
    cb = math.ceil(C / 64)
    tiles_r, tiles_p = B * L / 64, B * L / 32
    chunks = max(1, min(math.ceil(L / 128), math.ceil(2 * SM_COUNT / B)))  # its chunk plan
    ws = B * chunks * S * C * 4
    torch_ops = [("PyTorch qs (8 launches)", 8 * sc, 0, 0)]
    small = [(f"PyTorch qs (8 launches) #{i}", 0, 0, 0) for i in range(7)]
    return {
        "cluster_fwd": torch_ops
        + small
        + [
            ("cluster_fwd_partial", x + ws, 2 * x * cb + tiles_r * cb * q32 / B, 4 * slc * cb),
            ("cluster_fwd_combine", ws + s32, 0, 0),
        ],
        "dispatch_fwd": torch_ops
        + small
        + [("dispatch_fwd", 2 * x + sc, x * (cb > 1) + tiles_p * (q32 + sc) / B, 3 * slc)],
        "cluster_bwd": torch_ops
        + small
        + [
            ("pixel_bwd", 2 * x, x + tiles_p * (3 * sc + 3 * q32 / B * B) / B, 5 * slc),
            (
                "reduce_bwd",
                x + ws,
                2 * x * cb + tiles_r * cb * (q32 + sc) / B + B * chunks * cb * (sc + s32) / B,
                5 * slc * cb,
            ),
            ("sum_chunks", ws + s32, 0, 0),
        ],
        "dispatch_bwd": torch_ops
        + small
        + [
            ("pixel_bwd", 3 * x, 2 * x + tiles_p * (2 * q32 + sc) / B, 4 * slc),
            ("reduce_bwd", 2 * x + 2 * ws, 3 * x * cb + tiles_r * cb * (q32 + sc) / B, 6 * slc * cb),
            ("sum_chunks", ws + s32, 0, 0),
            ("sum_chunks #dslots", ws + sc, 0, 0),
        ],
    }


def one_product(fwd, bwd):
    """What-if, not the kernels: ``after`` with one product instead of hi/lo for clustering's
    ``P @ x`` (``fwd``) and ``dqs`` (``bwd``) where a kernel holds all of C. Too inaccurate
    (docs/math.md#one-product); printed to show what the split costs."""

    def model(L, C):
        ops = after(L, C)
        slc = B * S * L * C
        cf = _plan("cluster_fwd_chunk", L, C)[0]
        pb = _plan("pixel_bwd", L, C)[0]
        for op, kernel, cut, held in (
            ("cluster_fwd", "cluster_fwd_chunk", fwd, _held(cf, 1) and cf.block_c >= C),
            ("cluster_bwd", "pixel_bwd", bwd, pb.block_c >= C and not pb.one_tile),
        ):
            if cut and held:
                ops[op] = [(k, h, l, m - slc if k == kernel else m) for k, h, l, m in ops[op]]
        return ops

    return model


def totals(name, model):
    """Per stage, the four ops' predicted time against the floor."""
    parts = []
    for stage, (C, L) in STAGES.items():
        floor = sum(floor_bytes(L, C).values()) / HBM_BW * 1e6
        t = sum(_us(h, l, m) for kernels in model(L, C).values() for _, h, l, m in kernels)
        parts.append(f"{stage} {t:.0f} us ({100 * floor / t:.0f}%)")
    print(f"- {name}: " + ", ".join(parts))


def table(name, model):
    """Per stage and op: one row per kernel, then the op's total against its floor."""
    print(f"\n| {name}: stage, op | kernel | HBM MB | L2 MB | tensor-core GFLOP | predicted us |")
    print("|---|---|---|---|---|---|")
    for stage, (C, L) in STAGES.items():
        floors = floor_bytes(L, C)
        total_t = total_floor = 0.0
        for op, kernels in model(L, C).items():
            t_op = 0.0
            for kernel, hbm, l2, macs in _merged(kernels):
                t = sum(_us(h, l, m) for k, h, l, m in kernels if k.split(" #")[0] == kernel)
                t_op += t
                print(
                    f"| {stage} {op} | {kernel} | {hbm / 1e6:.1f} | {l2 / 1e6:.1f} | {2 * macs / 1e9:.1f} | {t:.1f} |"
                )
            floor = floors[op] / HBM_BW * 1e6
            total_t, total_floor = total_t + t_op, total_floor + floor
            print(
                f"| {stage} {op} | *total* | *{floors[op] / 1e6:.1f} at the floor* | | | "
                f"*{t_op:.1f} (floor {floor:.1f}: {100 * floor / t_op:.0f}%)* |"
            )
        print(
            f"| **{stage}, all four ops** | | | | | **{total_t:.0f} (floor {total_floor:.0f}: "
            f"{100 * total_floor / total_t:.0f}%)** |"
        )


def _merged(kernels):
    """Kernels of one name (``name #i``: separate launches) summed into one row."""
    rows = {}
    for kernel, hbm, l2, macs in kernels:
        name = kernel.split(" #")[0]
        h, l, m = rows.get(name, (0, 0, 0))
        rows[name] = (h + hbm, l + l2, m + macs)
    return [(k, *v) for k, v in rows.items()]


if __name__ == "__main__":
    table("before", before)
    table("previous", previous)
    table("one-tile", one_tile)
    table("own qs", own_qs)
    table("after", after)
    print("\nWhat-if, not kept (one product instead of hi/lo, all of C held; see docs/math.md):\n")
    totals("one product for the forward's P @ x", one_product(True, False))
    totals("one product for the backward's dqs", one_product(False, True))
    totals("both", one_product(True, True))
