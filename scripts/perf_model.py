"""A performance model of the CUDA kernels (not a measurement): bytes, operations and predicted
times at glnet_4g stages 1, 3 and 4 (B = 128, bf16) on an H100 and an H200, for the current
CUDA-core kernels and for the tensor-core design. docs/performance.md explains every figure;
`python3 scripts/perf_model.py [--f-tc 0.5]` prints its table (markdown).
"""

import math

B, S, E = 128, 64, 2  # batch, slots, bytes per bf16 element
STAGES = {1: (3136, 64), 3: (196, 256), 4: (49, 512)}  # stage: (L, C) at 224 x 224 input
GPUS = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s; same GH100 compute on both

SMS, CLOCK = 132, 1.83e9  # the clock at which the 989 TFLOP/s dense bf16 peak is quoted
TC_PEAK = 4096 * SMS * CLOCK  # dense bf16 FLOP/s (4096 FLOP per SM per clock)
ALU_PEAK = 128 * SMS * CLOCK  # fp32 CUDA-core operations/s
MUFU_PEAK = 16 * SMS * CLOCK  # exp2 and other special functions/s
LDS_PEAK = 32 * SMS * CLOCK  # 32-bit shared-memory words/s, conflict-free

F_MEM, F_TC, F_CC = 0.85, 0.5, 0.7  # reachable fractions of peak: HBM, mma.sync on sm_90, CUDA cores
T_LAUNCH = 2e-6  # per kernel launch, back to back in a stream


def kernels(L, C):
    """Per kernel: minimum HBM bytes, products (each 2 B S L C FLOP), CUDA-core ops per logit and
    per pixel channel, special functions per logit, launches, and the current kernels' shared-memory
    words per multiply-add summed over their products (read from the code)."""
    x, sc, stat_l, stat_s = B * L * C * E, B * S * C * E, B * L * 4, B * S * 4
    return {
        # reads x, init_slots; writes fp32 slots and lse
        "cluster_fwd": dict(
            bytes=x + sc + 2 * sc + stat_s, products=2, alu=6, alu_lc=2, mufu=1, launches=1, lds_per_mac=1 + 2
        ),
        # reads x, init_slots, slots; writes out, lse
        "dispatch_fwd": dict(
            bytes=2 * x + 2 * sc + stat_l, products=2, alu=6, alu_lc=2, mufu=1, launches=1, lds_per_mac=1 + 2
        ),
        # reads G, x, init_slots, fp32 slots, lse; writes dx, d_init_slots
        "cluster_bwd": dict(
            bytes=2 * x + 3 * sc + 2 * sc + stat_s,
            products=5,
            alu=8,
            alu_lc=6,
            mufu=1,
            launches=2,
            lds_per_mac=1 + 1 + 2 + 2 + 3,
        ),
        # reads grad, x, init_slots, slots, lse; writes dx, d_init_slots, dslots
        "dispatch_bwd": dict(
            bytes=3 * x + 4 * sc + stat_l,
            products=5,
            alu=9,
            alu_lc=6,
            mufu=1,
            launches=2,
            lds_per_mac=1 + 1 + 2 + 2.5 + 2.5,
        ),
    }


FILL_BLOCKS = 32  # plan.h's kFillBlocks


def n_chunks(L, blocks=B):
    """plan_mma_chunks for the tensor-core split-L kernels: 64-pixel tiles, `blocks` blocks per
    chunk (B for S <= 64; the backward's slot_bwd_mma B times its channel chunks). One chunk once
    the blocks fill at least 7/8 of the SMs (B = 128 does), else plan_chunks' four blocks per SM."""
    if blocks >= FILL_BLOCKS and 8 * blocks >= 7 * SMS:
        return 1
    return max(1, min(math.ceil(4 * SMS / blocks), math.ceil(L / 64)))


def built_kernels(L, C):
    """The tensor-core kernels as written (csrc/cuda/mma_kernels.cuh), 16-bit x: products counted
    as issued (qs split in two for the logits; dA in two; dK = dA^T qs in three; slot_bwd_mma's
    logits once per channel chunk: 128 channels for the clustering, 64 for the dispatch), the
    extra bytes of the split-L workspaces (fp32, written and read; none for the clustering forward
    with one chunk) and of the backward's second
    pass over x (and the dispatch's grad and delta'), and every launch. slot_bwd_mma's blocks of
    one tile's channel chunks run side by side and read the same x tile: counted once (from L2
    after the first). C > 256: the wide forwards (channel blocks of 256: the clustering's blocks
    of one slot tile each compute the logits over all C and the value product of their block; the
    dispatch computes them once for its blocks, S <= 64) and the wide backwards (the same products
    as the narrow ones, S <= 64: pixel_bwd_wide_mma computes the logits once per tile,
    slot_bwd_wide_mma once per channel chunk; their second reads of x, qs and G per chunk
    counted as L2 hits, as slot_bwd_mma's shared x tile)."""
    x, stat_l = B * L * C * E, B * L * 4
    ncb = math.ceil(C / 256)  # the wide forwards' channel blocks (1: not wide)
    # The clustering forward's (B, chunks, S, C) fp32 workspace, written and read, and its combine;
    # with one chunk the chunk kernel writes slots and lse itself: neither.
    fwd_chunks = n_chunks(L, B * ncb)
    ws = 0 if fwd_chunks == 1 else fwd_chunks * B * S * C * 4 * 2
    k = kernels(L, C)
    fwd = bwd = True
    # slot_bwd_mma's (slot_bwd_wide_mma's) channel chunks
    ncc = {"cluster_bwd": max(1, math.ceil(C / 128)), "dispatch_bwd": max(1, math.ceil(C / 64))}
    ws_b = {name: n_chunks(L, B * n) * B * S * C * 4 * 2 for name, n in ncc.items()}
    built = {
        # cluster_fwd_chunk_mma (logits 2, value 1; wide: logits 2 per channel block) + cluster_fwd_combine
        # when L is split
        "cluster_fwd": fwd
        and dict(
            k["cluster_fwd"],
            bytes=k["cluster_fwd"]["bytes"] + ws,
            products=2 * ncb + 1,
            launches=1 if fwd_chunks == 1 else 2,
        ),
        "dispatch_fwd": fwd and dict(k["dispatch_fwd"], products=3, launches=1),
        # cluster_delta; pixel_bwd_mma (logits 2, G x^T 1, P^T G 1, dK 3); slot_bwd_mma (logits 2,
        # G x^T 1, per channel chunk; dqs 2); sum_chunks
        "cluster_bwd": bwd
        and dict(
            k["cluster_bwd"],
            bytes=k["cluster_bwd"]["bytes"] + x + ws_b["cluster_bwd"],
            products=9 + 3 * ncc["cluster_bwd"],
            launches=4,
        ),
        # pixel_bwd_mma (logits 2, dD 1, dK 3); slot_bwd_mma (logits 2, dD 1, per channel chunk;
        # dqs 2, dslots 1); two sum_chunks
        "dispatch_bwd": bwd
        and dict(
            k["dispatch_bwd"],
            bytes=k["dispatch_bwd"]["bytes"] + 2 * x + 3 * stat_l + 2 * ws_b["dispatch_bwd"],
            products=9 + 3 * ncc["dispatch_bwd"],
            launches=4,
        ),
    }
    # fused_bwd_mma where S <= 64, C <= 64 and its B blocks take one chunk per batch element: one
    # kernel per op, x read once, no workspace. Clustering: cluster_delta, then logits 2, G x^T 1,
    # P^T G 1, dK 3, dqs 2; dispatch: logits 2, dD 1, dK 3, dqs 2, dslots 1.
    if C <= 64 and S <= 64 and n_chunks(L, B) == 1:
        built["cluster_bwd"] = dict(k["cluster_bwd"], products=9, launches=2)
        built["dispatch_bwd"] = dict(k["dispatch_bwd"], products=9, launches=1)
    return built


def design_time(k, L, C, bw):
    """max(memory, tensor cores + CUDA cores) + launches. One CTA per batch element (B = 128 fills
    128 of 132 SMs: plan_chunks needs no split of L), so compute runs on 128 SMs."""
    pad = math.ceil(L / 16) * 16 / L  # m16n8k16 tiles over a pixel count that is not a multiple of 16
    flops = k["products"] * 2 * B * S * L * C * pad
    t_tc = flops / (F_TC * TC_PEAK)
    t_cc = max(
        (k["alu"] * B * S * L + k["alu_lc"] * B * L * C) / (F_CC * ALU_PEAK), k["mufu"] * B * S * L / (F_CC * MUFU_PEAK)
    )
    waves = SMS / min(B, SMS)
    t_mem = k["bytes"] / (F_MEM * bw)
    return max(t_mem, (t_tc + t_cc) * waves) + k["launches"] * T_LAUNCH, flops, t_mem, (t_tc + t_cc) * waves


def current_time(k, L, C, bw):
    """The current kernels: every product on fp32 CUDA cores, bound by shared-memory loads."""
    t_lds = k["lds_per_mac"] * B * S * L * C / LDS_PEAK
    return max(k["bytes"] / (F_MEM * bw), t_lds) + k["launches"] * T_LAUNCH


def us(t):
    return f"{t * 1e6:,.0f}" if t >= 1e-5 else f"{t * 1e6:.1f}"


def print_built():
    """The kernels as written: tensor cores where the backend launches them, else the current time."""
    print(
        "| stage | kernel | runs on | MB | tensor-core GFLOP (as issued) | floor H100 (us) "
        "| predicted H100 / H200 (us) | fraction of floor H100 / H200 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for st, (L, C) in STAGES.items():
        built = built_kernels(L, C)
        tot = {"mb": 0.0, "gf": 0.0, "floor": {g: 0.0 for g in GPUS}, "t": {g: 0.0 for g in GPUS}}
        for name, k in kernels(L, C).items():
            b = built[name]
            floor = {g: k["bytes"] / bw for g, bw in GPUS.items()}
            if b:
                t = {g: design_time(b, L, C, bw)[0] for g, bw in GPUS.items()}
                mb, gf = b["bytes"] / 1e6, design_time(b, L, C, GPUS["H100"])[1] / 1e9
                where = "tensor cores (wide)" if C > 256 else "tensor cores"
            else:
                t = {g: current_time(k, L, C, bw) for g, bw in GPUS.items()}
                mb, gf, where = k["bytes"] / 1e6, 0.0, "CUDA cores"
            frac = " / ".join(f"{floor[g] / t[g]:.0%}" for g in GPUS)
            print(
                f"| {st} | {name} | {where} | {mb:.1f} | {gf:.2f} | {us(floor['H100'])} | "
                f"{us(t['H100'])} / {us(t['H200'])} | {frac} |"
            )
            tot["mb"], tot["gf"] = tot["mb"] + mb, tot["gf"] + gf
            for g in GPUS:
                tot["floor"][g] += floor[g]
                tot["t"][g] += t[g]
        frac = " / ".join(f"{tot['floor'][g] / tot['t'][g]:.0%}" for g in GPUS)
        print(
            f"| {st} | **block fwd+bwd** | | {tot['mb']:.1f} | {tot['gf']:.2f} | {us(tot['floor']['H100'])} | "
            f"{us(tot['t']['H100'])} / {us(tot['t']['H200'])} | {frac} |"
        )


def main():
    import argparse

    global F_TC
    ap = argparse.ArgumentParser(description="print the model's table (markdown)")
    ap.add_argument("--f-tc", type=float, default=F_TC, help="fraction of the dense tensor-core peak reached")
    ap.add_argument("--built", action="store_true", help="the kernels as written instead of the design")
    args = ap.parse_args()
    F_TC = args.f_tc
    if args.built:
        print_built()
        return
    print(
        "| stage | kernel | min MB | tensor-core GFLOP | CUDA-core Mop | floor H100 / H200 (us) "
        "| current H100 (us) | design H100 / H200 (us) | design, fraction of floor H100 / H200 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for st, (L, C) in STAGES.items():
        tot = dict(floor={g: 0.0 for g in GPUS}, cur=0.0, des={g: 0.0 for g in GPUS}, mb=0.0, gf=0.0, mop=0.0)
        for name, k in kernels(L, C).items():
            floor = {g: k["bytes"] / bw for g, bw in GPUS.items()}
            des = {g: design_time(k, L, C, bw)[0] for g, bw in GPUS.items()}
            flops = design_time(k, L, C, GPUS["H100"])[1]
            mop = (k["alu"] * B * S * L + k["alu_lc"] * B * L * C + k["mufu"] * B * S * L) / 1e6
            cur = current_time(k, L, C, GPUS["H100"])
            frac = " / ".join(f"{floor[g] / des[g]:.0%}" for g in GPUS)
            print(
                f"| {st} | {name} | {k['bytes'] / 1e6:.1f} | {flops / 1e9:.2f} | {mop:.0f} | "
                f"{us(floor['H100'])} / {us(floor['H200'])} | {us(cur)} | {us(des['H100'])} / {us(des['H200'])} "
                f"| {frac} |"
            )
            for g in GPUS:
                tot["floor"][g] += floor[g]
                tot["des"][g] += des[g]
            tot["cur"] += cur
            tot["mb"] += k["bytes"] / 1e6
            tot["gf"] += flops / 1e9
            tot["mop"] += mop
        frac = " / ".join(f"{tot['floor'][g] / tot['des'][g]:.0%}" for g in GPUS)
        print(
            f"| {st} | **block fwd+bwd** | {tot['mb']:.0f} | {tot['gf']:.1f} | {tot['mop']:.0f} | "
            f"{us(tot['floor']['H100'])} / {us(tot['floor']['H200'])} | {us(tot['cur'])} | "
            f"{us(tot['des']['H100'])} / {us(tot['des']['H200'])} | {frac} |"
        )


if __name__ == "__main__":
    main()
