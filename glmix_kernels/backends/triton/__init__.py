"""The ``"triton"`` backend: the four ops of the contract as torch.library ops ``glmix_triton::*``.

Entry points, by op (kernels in ``kernels.py``):

- ``cluster_fwd``: ``scaled_queries``, ``cluster_fwd_chunk`` over (batch x slot block, chunk,
  C block), ``cluster_fwd_combine`` (log-sum-exp combine of the chunks) into fp32 slots; at few
  pixels and many channels (16-bit) ``cluster_fwd_tile`` over (batch, chunk) instead of the
  first two, one tile of all slots per chunk.
- ``dispatch_fwd``: ``scaled_queries``, ``dispatch_fwd`` over (batch, chunk); a tile holds all S.
- ``cluster_bwd`` / ``dispatch_bwd``: ``scaled_queries`` (with clustering's ``delta``),
  ``pixel_bwd`` (``dx``), ``slot_bwd`` (per-chunk partials of ``dqs``, ``dslots``; ``pixel_bwd``
  sums them itself when one tile holds all of S and C, as at the first GLNet stages, or all of S
  and a whole chunk, as at the last ones, and then also makes ``delta``), ``query_bwd``
  (``d_init_slots``, parts of ``dscale``), ``sum_chunks`` (``dscale``, ``dslots``). Sums run in
  a fixed order: results are bitwise reproducible without atomics.

A kernel that reads its S x C operands once per program (one holding all of C; the one-tile
kernels; 16-bit ``dispatch_fwd`` over C blocks, which loads them per pixel tile anyway) makes
``qs`` from ``init_slots`` and ``scale`` itself, and no ``scaled_queries`` runs before it.

No ``(B, S, L)`` tensor exists anywhere; the workspaces are ``O(B * chunks * S * C)``. On CPU
tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``).

Tile configurations are pinned: ``pick_config`` chooses one per kernel from (S, C, dtype), so a
first call compiles each kernel once and benchmarks nothing, results do not depend on a timing
race between processes, and a CUDA graph can capture any call after one warm-up call of the same
shapes outside the capture (the warm-up compiles and loads the kernels). With
``GLMIX_TRITON_AUTOTUNE=1`` the first call per (S, C, layout, op, dtype) instead benchmarks the
few ``candidate_configs``; do that warm-up outside any capture too. ``scripts/triton_compile_report.py``
compiles every candidate for the GLNet stage shapes and fails on a register spill.
"""

import contextlib
import functools
import os
import sys
from dataclasses import dataclass, replace

import torch
import triton

from .. import contract, registrations
from . import kernels

AUTOTUNE = os.environ.get("GLMIX_TRITON_AUTOTUNE") == "1"
_SUM_BLOCK = 1024
# Slot rows per program of the split-L kernels; pixel kernels hold all S (at most 256) slots.
_MAX_BLOCK_S = 64
# Up to this many (slot, channel) elements per tile, a kernel holds all of C at once
# (``ONE_C_BLOCK``); larger tiles would spill registers (the compile report). fp32 operands take
# twice the registers and tf32x3 three products per dot: a quarter of the budget.
_ONE_C_BLOCK_ELEMENTS = 64 * 128
# Above this many channels no kernel holds all of C: 256 and 512 spill at any slot block.
_ONE_C_BLOCK_MAX_C = 128


@dataclass(frozen=True)
class TileConfig:
    block_s: int
    block_l: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 2
    # Split-L kernels: channels per step of the logits loop over all of C (``SCORE_C``). 0: with
    # one C block the S x C operands are held across the pixel loop, else the steps are C blocks.
    score_c: int = 0
    # pixel_bwd over C blocks and cluster_fwd_tile: a chunk is one tile of ``block_l`` pixels
    # (``_one_tile_config``).
    one_tile: bool = False

    def meta(self, C, fn):
        meta = dict(
            BLOCK_S=self.block_s,
            BLOCK_L=self.block_l,
            BLOCK_C=self.block_c,
            ONE_C_BLOCK=self.block_c >= C and not self.score_c,
            NUM_STAGES=self.num_stages,
        )
        if "SCORE_C" in fn.arg_names:
            meta["SCORE_C"] = self.score_c or self.block_c
        return {k: v for k, v in meta.items() if k in fn.arg_names}


# The kernels that take a TileConfig: split-L kernels (a block of slots per program) and pixel
# kernels (every slot per program).
SPLIT_L_KERNELS = ("cluster_fwd_chunk", "slot_bwd")
PIXEL_KERNELS = ("dispatch_fwd", "pixel_bwd")


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(n))  # tl.dot needs 16 per side


def pick_config(kernel, S, C, dtype, L=None):
    """The pinned tile configuration of ``kernel`` for S slots, C channels and x's ``dtype`` (and
    for ``pixel_bwd`` L pixels, see ``_one_tile_config``). Every rule comes from the compile
    report (sm_80 and sm_90, Triton 3.6 and 3.9): no config it picks spills registers or needs
    more shared memory than an SM has."""
    if kernel == "cluster_fwd_tile":
        return _one_tile_config(S, L, dtype, 2 * _ONE_TILE_ELEMENTS)
    cfg = _tile_config(kernel, S, C, dtype)
    if kernel == "pixel_bwd" and cfg.block_c < C:
        return _one_tile_config(S, L, dtype) or cfg
    return cfg


def _tile_config(kernel, S, C, dtype):
    fp32 = dtype == torch.float32
    budget = _ONE_C_BLOCK_ELEMENTS // (4 if fp32 else 1)
    if kernel in ("pixel_bwd", "slot_bwd"):
        budget //= 2  # they also hold G and the dqs (and dslots) sums
    c = _pow2(C)
    if kernel in SPLIT_L_KERNELS:
        # Fewer slot rows rather than several C blocks: each C block recomputes the logits over
        # all of C, while each slot block only reads x again (from L2).
        block_s = min(_pow2(S), _MAX_BLOCK_S, max(16, budget // c))
    else:
        block_s = _pow2(S)
    one_c = c <= _ONE_C_BLOCK_MAX_C and c * block_s <= budget
    if kernel in SPLIT_L_KERNELS and not one_c:
        return _looped_config(kernel, S, c, fp32)
    block_c = c if one_c else max(16, min(64, budget // 2 // block_s))
    big = one_c and block_s * block_c >= 4096  # large tiles held across the pixel loop
    block_l = 16 if fp32 else 64 if block_s <= 64 and one_c else 32
    num_warps = 4
    if big and kernel in SPLIT_L_KERNELS:
        block_l = 32
    if big and kernel in PIXEL_KERNELS:
        num_warps = 8
    if kernel == "pixel_bwd":
        block_l = 16  # it also holds G (and the dqs and dslots sums)
    if kernel in PIXEL_KERNELS and not one_c and not fp32:
        # Over C blocks the tiles hold no S x C operand: wide pixel tiles, each reloading the
        # operands from L2 for more pixels (pixel_bwd's 64-pixel tiles spill on sm_80).
        block_l, num_warps = 32 if kernel == "pixel_bwd" else 64, 8
    # slot_bwd holds two (BLOCK_S, BLOCK_C) sums (dispatch) beside the logits: no room for the
    # next pixel tile's loads in flight.
    num_stages = 1 if kernel == "slot_bwd" else 2
    if kernel == "slot_bwd" and c > 64:
        block_l = 16
    if kernels.INTERPRET:
        block_l = min(block_l, kernels.CHUNK_QUANTUM)
    return TileConfig(block_s, block_l, block_c, num_warps, num_stages)


# Split-L kernels too wide to hold their S x C operands: (widest C block, most slot x channel
# elements) of the sums per program at 8 warps, (bf16/fp16, fp32). From the compile report:
# wider or larger ones spill (slot_bwd's dispatch sums at 16 x 512 bf16 or 16 x 128 fp32).
_LOOPED_TILES = {"cluster_fwd_chunk": ((512, 8192), (256, 4096)), "slot_bwd": ((256, 8192), (64, 1024))}


def _looped_config(kernel, S, c, fp32):
    """A split-L kernel whose logits take 64 (fp32: 32) channels per step over all of C, and whose
    sums span C blocks as wide as fit: most shapes have one C block, so the logits of a tile are
    computed once (not once per C block), at the price of fewer slot rows per program."""
    max_c, elements = _LOOPED_TILES[kernel][fp32]
    block_c = min(c, max_c)
    block_s = max(16, min(_pow2(S), _MAX_BLOCK_S, elements // block_c))
    # cluster_fwd_chunk's 32-pixel tiles spill at 512 channels; slot_bwd holds two sums.
    block_l = 32 if kernel == "cluster_fwd_chunk" and not fp32 and block_c <= 256 else 16
    num_stages = 2 if kernel == "cluster_fwd_chunk" else 1
    return TileConfig(block_s, block_l, block_c, 8, num_stages, score_c=32 if fp32 else 64)


# pixel_bwd over C blocks with one tile per chunk: at most this many (slot, pixel) elements per
# tile (three fp32 tiles of them live through the logits loop; cluster_fwd_tile: twice as many,
# 206 registers at 64 x 256) and at most this many chunks (each adds an fp32 (S, C) partial per
# batch element to write and sum).
_ONE_TILE_ELEMENTS = 64 * 128
_ONE_TILE_MAX_CHUNKS = 2


def _one_tile_config(S, L, dtype, elements=_ONE_TILE_ELEMENTS):
    """``pixel_bwd`` where one tile holds all S slots and a whole chunk of few pixels (glnet's
    stages 3-4), but not all of C (``pick_config`` asks only then): it then also writes the
    chunk's ``dqs`` (and ``dslots``) sums, C block by C block, and no ``slot_bwd`` runs, which
    would compute the logits again and reload its S x C operands every 16 pixels. Tiles of up to
    twice as many pixels (``elements``) for ``cluster_fwd_tile``, where ``cluster_fwd_chunk``
    would step its logits over C. None where that does not apply (fp32: its tf32x3 tiles spill
    at these sizes; more than 64 slots: not in the compile report)."""
    block_s = _pow2(S)
    if L is None or dtype == torch.float32 or block_s > 64:
        return None
    block_l = min(_pow2(L), elements // 64, elements // block_s)
    if kernels.INTERPRET:
        block_l = min(block_l, kernels.CHUNK_QUANTUM)
    if triton.cdiv(L, block_l) > _ONE_TILE_MAX_CHUNKS:
        return None
    # pixel_bwd spills with 32-channel blocks on sm_80 at 64 x 64 tiles over 512 channels
    # (dispatch), with 4 warps at 64 x 128: 16 channels, 8 warps only. One tile: no pipelining.
    return TileConfig(block_s, block_l, 16, num_warps=8, num_stages=1, one_tile=True)


def candidate_configs(kernel, S, C, dtype, L=None):
    """What ``GLMIX_TRITON_AUTOTUNE=1`` chooses among: the pinned config and, where it compiles
    without spills, one with the other warp count (4 or 8). The compile report checks them all."""
    pinned = pick_config(kernel, S, C, dtype, L)
    if kernels.INTERPRET or pinned.score_c or pinned.one_tile:
        return [pinned]  # the looped and one-tile configs spill with 4 warps
    if kernel == "slot_bwd":
        return [pinned]  # clustering's sum of dA (the centred dqs) spills 12 bytes at 8 warps, 32 x 128 bf16
    return [pinned, replace(pinned, num_warps=12 - pinned.num_warps)]


@functools.cache
def _pinned(fn, cfg, C):
    # A one-config autotuner: torch.compile and wrap_triton take it as they take any, and
    # Triton benchmarks nothing when there is a single config.
    return triton.autotune(
        [triton.Config(cfg.meta(C, fn), num_warps=cfg.num_warps, num_stages=cfg.num_stages)], key=[]
    )(fn)


@functools.cache
def _tuned(fn, cfgs, C):
    configs = [triton.Config(c.meta(C, fn), num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs]
    # The op (CLUSTER) and x's layout change what is fastest; Triton adds the dtypes to the key.
    key = ["S", "C", "X_LAYOUT"] + (["CLUSTER"] if "CLUSTER" in fn.arg_names else [])
    return triton.autotune(configs, key=key)(fn)


def _tiled(name, S, C, dtype, L=None):
    """Kernel ``name`` with its tile configuration bound."""
    fn = getattr(kernels, name)
    if AUTOTUNE:
        return _launch(_tuned(fn, tuple(candidate_configs(name, S, C, dtype, L)), C))
    return _launch(_pinned(fn, pick_config(name, S, C, dtype, L), C))


@functools.cache
def _programs_wanted(device):
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: enough chunks that the split-L path runs at test sizes


def plan_chunks(B, S, L, device, block_s=None):
    """``(chunk_len, n_chunks)``: L cut into chunks of whole ``CHUNK_QUANTUM`` pixels, so that
    ``B * slot blocks * chunks`` fills the device, but no more chunks than that: each adds a
    (B, S, C) fp32 partial to write and sum. Depends only on the shape and device (not on the
    tile config): the chunks and their summation order are fixed for a shape.
    """
    n_sb = triton.cdiv(S, block_s) if block_s else 1
    quanta = triton.cdiv(L, kernels.CHUNK_QUANTUM)
    chunks_wanted = max(1, min(quanta, _programs_wanted(device) // (B * n_sb)))
    chunk_len = triton.cdiv(quanta, chunks_wanted) * kernels.CHUNK_QUANTUM
    return chunk_len, triton.cdiv(L, chunk_len)


def _layout(x):
    if x.stride(2) == 1:
        return kernels.LAYOUT_CHANNELS_LAST
    return kernels.LAYOUT_NCHW if x.stride(1) == 1 else kernels.LAYOUT_OTHER


def _upcast(x):
    return kernels.INTERPRET and x.dtype == torch.bfloat16


def _device_guard(x):
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _tile_args(x, qs_hi, qs_lo):
    """Arguments every tiled kernel takes: ``x``, the split queries, the sizes, strides and flags."""
    _, L, C = x.shape
    return dict(
        x_ptr=x,
        qh_ptr=qs_hi,
        ql_ptr=qs_lo,
        S=qs_hi.shape[1],
        L=L,
        C=C,
        **_strides("sx", x),
        sq_b=_batch_stride(qs_hi),
        X_LAYOUT=_layout(x),
        SPLIT=x.dtype != torch.float32,
        UPCAST=_upcast(x),
    )


def _one_c_block(cfg, C):
    """Whether ``cfg`` holds all of C at once (the kernels' ``ONE_C_BLOCK``)."""
    return cfg.block_c >= C and not cfg.score_c


def _split_l_grid(B, S, n_chunks, C):
    return lambda meta: (B * triton.cdiv(S, meta["BLOCK_S"]), n_chunks, triton.cdiv(C, meta["BLOCK_C"]))


def _queries_unless(normalize, x, init_slots, scale):
    """``qs_hi, qs_lo`` for a kernel launch; with ``normalize`` the kernel makes them from
    ``init_slots`` itself and the pointers are not read: any valid tensors."""
    return (init_slots, init_slots) if normalize else _queries(x, init_slots, scale)[:2]


def _tile_chunks(cfg, L):
    """``(chunk_len, n_chunks)`` of a one-tile config: a chunk is one tile of ``block_l`` pixels."""
    return cfg.block_l, triton.cdiv(L, cfg.block_l)


def _queries(x, init_slots, scale, grad=None, slots=None):
    """``qs_hi, qs_lo`` (Bq, S, C) in x's dtype, ``qs_lo`` a stand-in for ``qs_hi`` in fp32; with
    clustering's ``grad`` and fp32 ``slots`` also ``delta = rowsum(grad * slots)`` (B, S)."""
    Bq, S, C = init_slots.shape
    split = x.dtype != torch.float32
    qs_hi = x.new_empty((Bq, S, C))
    qs_lo = torch.empty_like(qs_hi) if split else qs_hi
    with_delta = grad is not None
    delta = x.new_empty((x.shape[0], S), dtype=torch.float32) if with_delta else qs_hi
    if not with_delta:  # not read: any valid tensor
        grad, slots = init_slots, init_slots
    block_s = min(_pow2(S), 16)  # 32 fp64 rows spill on sm_90 (compile report)
    grid_b = x.shape[0] if with_delta else Bq
    _launch(kernels.scaled_queries)[(grid_b * triton.cdiv(S, block_s),)](  # fp64: no pipelining, no spills
        s0_ptr=init_slots,
        scale_ptr=scale,
        qh_ptr=qs_hi,
        ql_ptr=qs_lo,
        g_ptr=grad,
        v_ptr=slots,
        delta_ptr=delta,
        Bq=Bq,
        S=S,
        C=C,
        **_strides("ss", init_slots),
        **_strides("sg", grad),
        **_strides("sv", slots),
        SPLIT=split,
        WITH_DELTA=with_delta,
        BLOCK_S=block_s,
        BLOCK_C=64,
        num_stages=1,
    )
    return qs_hi, qs_lo, delta


def _strides(prefix, t):
    """``t``'s strides as keyword arguments ``{prefix}_b, _r, _c`` (the kernels' names); a
    batch stride of 0 for a broadcast batch of 1."""
    names = {
        "sx": ("sx_b", "sx_l", "sx_c"),
        "ss": ("ss_b", "ss_s", "ss_c"),
        "sg": ("sg_b", "sg_s", "sg_c"),
        "sv": ("sv_b", "sv_s", "sv_c"),
    }[prefix]
    b = 0 if t.shape[0] == 1 else t.stride(0)
    return dict(zip(names, (b, t.stride(1), t.stride(2))))


def _batch_stride(t):
    return 0 if t.shape[0] == 1 else t.stride(0)


def _grad_strides(g):
    s = _strides("sg", g)
    return dict(sg_b=s["sg_b"], sg_r=s["sg_s"], sg_c=s["sg_c"])


def _sum_chunks(ws, out):
    """``out`` (B, N) = ``ws`` (B, chunks, N) summed over chunks in order."""
    B, n_chunks, N = ws.shape[0], ws.shape[1], ws[0, 0].numel()
    block = min(_SUM_BLOCK, triton.next_power_of_2(N))
    _launch(kernels.sum_chunks)[(B * triton.cdiv(N, block),)](
        ws_ptr=ws, out_ptr=out, n_chunks=n_chunks, N=N, BLOCK=block
    )


def _query_grads(dq_ws, init_slots, scale, d_init, dscale, cluster):
    """``d_init_slots`` and ``dscale`` from the (B, chunks, S, C) partials of ``dqs``; dispatch's
    ``dscale`` with the queries centred on their mean (its ``dqs`` sums to zero over the slots)."""
    Bq, S, C = init_slots.shape
    n_rows = dq_ws.shape[0] * dq_ws.shape[1] // Bq  # a broadcast init_slots sums every batch's chunks
    block_c = _pow2(C)
    # fp64 tiles: more would spill, as would dispatch's at this size with the queries' mean beside
    block_s = max(1, min(_pow2(S, 1), (2048 if cluster else 1024) // block_c))
    n_programs = Bq * triton.cdiv(S, block_s)
    dscale_parts = dq_ws.new_empty((1, n_programs, 1), dtype=torch.float64)
    _launch(kernels.query_bwd)[(n_programs,)](
        dq_ptr=dq_ws,
        s0_ptr=init_slots,
        scale_ptr=scale,
        d_init_ptr=d_init,
        dscale_ptr=dscale_parts,
        S=S,
        C=C,
        n_rows=n_rows,
        **_strides("ss", init_slots),
        CENTRE=not cluster,
        BLOCK_S=block_s,
        BLOCK_C=block_c,
    )
    _sum_chunks(dscale_parts, dscale.view(1, 1))


# torch.library.triton_op lets torch.compile see through the launchers into the kernels (torch
# 2.6+). Otherwise the ops are opaque custom ops with fake kernels: on older torch, and under the
# interpreter, whose kernels wrap_triton hands back unwrapped, so tracing would run them on fake
# tensors.
_TRACEABLE = hasattr(torch.library, "triton_op") and not kernels.INTERPRET
_launch = torch.library.wrap_triton if _TRACEABLE else (lambda kernel: kernel)


def _op(name, outputs):
    def register(fn):
        if _TRACEABLE:
            return torch.library.triton_op(f"glmix_triton::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"glmix_triton::{name}", fn, mutates_args=())
        op.register_fake(outputs)
        return op

    return register


def _check(op, x, init_slots, scale, slots=None, grad=None, grad_shape=None):
    """The input rules of the public functions and the backend's limits, for direct calls of the
    ``glmix_triton`` ops (the public functions have checked them already)."""
    from ..._validate import cluster_inputs, dispatch_inputs
    from .. import resolve

    if op.startswith("cluster"):
        cluster_inputs(x, init_slots, scale)
    else:
        dispatch_inputs(x, init_slots, scale, slots)
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-d tensor, got shape {tuple(scale.shape)}")
    resolve("triton", x, init_slots.shape[1])
    if grad is not None and tuple(grad.shape) != tuple(grad_shape):
        raise ValueError(f"grad must have shape {tuple(grad_shape)} (the {op[:-4]} output's), got {tuple(grad.shape)}")


@_op("cluster_fwd", contract.cluster_fwd_outputs)
def cluster_fwd(x: torch.Tensor, init_slots: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check("cluster_fwd", x, init_slots, scale)
    B, L, C = x.shape
    S = init_slots.shape[1]
    slots, lse = contract.cluster_fwd_outputs(x, init_slots, scale)
    with _device_guard(x):
        cfg = pick_config("cluster_fwd_chunk", S, C, x.dtype)
        tile = pick_config("cluster_fwd_tile", S, C, x.dtype, L) if cfg.score_c else None
        if tile:  # one tile of all slots per chunk
            block_s, (chunk_len, n_chunks) = tile.block_s, _tile_chunks(tile, L)
        else:
            block_s = cfg.block_s
            chunk_len, n_chunks = plan_chunks(B, S, L, x.device, block_s)
        one_chunk = n_chunks == 1  # the kernel writes the results: no workspaces, no combine
        m_ws = lse if one_chunk else x.new_empty((B, n_chunks, S), dtype=torch.float32)
        l_ws = lse if one_chunk else torch.empty_like(m_ws)
        acc_ws = slots if one_chunk else x.new_empty((B, n_chunks, S, C), dtype=torch.float32)
        out = dict(m_ptr=m_ws, l_ptr=l_ws, acc_ptr=acc_ws, ONE_CHUNK=one_chunk)
        if tile:
            _tiled("cluster_fwd_tile", S, C, x.dtype, L)[(B, n_chunks)](
                x_ptr=x,
                s0_ptr=init_slots,
                scale_ptr=scale,
                S=S,
                L=L,
                C=C,
                **_strides("sx", x),
                **_strides("ss", init_slots),
                X_LAYOUT=_layout(x),
                UPCAST=_upcast(x),
                **out,
            )
        else:
            # Holding all of C, each program reads its S x C operands once: it makes qs itself.
            normalize = _one_c_block(cfg, C)
            qs_hi, qs_lo = _queries_unless(normalize, x, init_slots, scale)
            _tiled("cluster_fwd_chunk", S, C, x.dtype)[_split_l_grid(B, S, n_chunks, C)](
                chunk_len=chunk_len,
                s0_ptr=init_slots,
                scale_ptr=scale,
                **_strides("ss", init_slots),
                NORMALIZE=normalize,
                **out,
                **_tile_args(x, qs_hi, qs_lo),
            )
        if one_chunk:
            return slots, lse
        block_c = min(_pow2(C), 128)
        _launch(kernels.cluster_fwd_combine)[(B * triton.cdiv(S, block_s), triton.cdiv(C, block_c))](
            m_ptr=m_ws,
            l_ptr=l_ws,
            acc_ptr=acc_ws,
            slots_ptr=slots,
            lse_ptr=lse,
            S=S,
            C=C,
            n_chunks=n_chunks,
            BLOCK_S=block_s,
            BLOCK_C=block_c,
        )
    return slots, lse


@_op("dispatch_fwd", contract.dispatch_fwd_outputs)
def dispatch_fwd(
    x: torch.Tensor, init_slots: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check("dispatch_fwd", x, init_slots, scale, slots)
    B, L, C = x.shape
    S = init_slots.shape[1]
    out, lse = contract.dispatch_fwd_outputs(x, init_slots, scale, slots)
    with _device_guard(x):
        # The kernel makes qs itself where it holds all of C (it reads the operands once), and over
        # several C blocks, as it loads them per pixel tile anyway (not fp32's 16-pixel tiles:
        # four times the work per pixel).
        cfg = pick_config("dispatch_fwd", S, C, x.dtype)
        normalize = _one_c_block(cfg, C) or x.dtype != torch.float32
        qs_hi, qs_lo = _queries_unless(normalize, x, init_slots, scale)
        chunk_len, n_chunks = plan_chunks(B, 1, L, x.device)
        _tiled("dispatch_fwd", S, C, x.dtype)[(B, n_chunks)](
            v_ptr=slots,
            out_ptr=out,
            lse_ptr=lse,
            s0_ptr=init_slots,
            scale_ptr=scale,
            chunk_len=chunk_len,
            NORMALIZE=normalize,
            **_strides("sv", slots),
            **_strides("ss", init_slots),
            **_tile_args(x, qs_hi, qs_lo),
        )
    return out, lse


@_op("cluster_bwd", contract.cluster_bwd_outputs)
def cluster_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    init_slots: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, _, C = x.shape
    S = init_slots.shape[1]
    _check("cluster_bwd", x, init_slots, scale, grad=grad, grad_shape=(B, S, C))
    dx, d_init, dscale = contract.cluster_bwd_outputs(grad, x, init_slots, scale, slots, lse)
    with _device_guard(x):
        dq_ws = _backward_kernels(grad, x, init_slots, scale, slots, lse, dx, cluster=True)[0]
        _query_grads(dq_ws, init_slots, scale, d_init, dscale, cluster=True)
    return dx, d_init, dscale


@_op("dispatch_bwd", contract.dispatch_bwd_outputs)
def dispatch_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    init_slots: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("dispatch_bwd", x, init_slots, scale, slots, grad=grad, grad_shape=x.shape)
    dx, d_init, dscale, dslots = contract.dispatch_bwd_outputs(grad, x, init_slots, scale, slots, lse)
    with _device_guard(x):
        dq_ws, dv_ws = _backward_kernels(grad, x, init_slots, scale, slots, lse, dx, cluster=False, dslots=dslots)
        _query_grads(dq_ws, init_slots, scale, d_init, dscale, cluster=False)
        if dv_ws is not dslots:
            _sum_chunks(dv_ws, dslots)
    return dx, d_init, dscale, dslots


def _backward_kernels(grad, x, init_slots, scale, slots, lse, dx, *, cluster, dslots=None):
    """``dx`` and the (B, chunks, S, C) partials of ``dqs`` and (dispatch) ``dslots``: ``pixel_bwd``
    alone when one tile holds all of S and C (it sums the partials as it goes) or all of S and a
    whole chunk of pixels (few pixels: one chunk per tile), and it then also normalises
    ``init_slots`` and computes clustering's ``delta`` itself; else ``scaled_queries``,
    ``pixel_bwd``, then ``slot_bwd``. ``slots``: clustering's fp32 forward result or dispatch's values. With a single
    chunk, dispatch's ``dslots`` partials are the result: written to ``dslots``."""
    B, L, C = x.shape
    S = init_slots.shape[1]
    cfg = pick_config("pixel_bwd", S, C, x.dtype, L)
    # pixel_bwd alone: it reads each S x C operand once per program and makes qs and clustering's
    # delta itself.
    slot_sums = _one_c_block(cfg, C) or cfg.one_tile
    if slot_sums:  # not read: any valid tensors
        qs_hi, qs_lo, delta = init_slots, init_slots, lse
    elif cluster:
        qs_hi, qs_lo, delta = _queries(x, init_slots, scale, grad, slots)
    else:
        qs_hi, qs_lo, _ = _queries(x, init_slots, scale)
        delta = x.new_empty(x.shape[:2], dtype=torch.float32)  # written by pixel_bwd
    args = dict(
        g_ptr=grad,
        v_ptr=slots,
        lse_ptr=lse,
        delta_ptr=delta,
        **_grad_strides(grad),
        **_strides("sv", slots),
        CLUSTER=cluster,
        **_tile_args(x, qs_hi, qs_lo),
    )
    if cfg.one_tile:
        chunk_len, n_chunks = _tile_chunks(cfg, L)
    else:
        chunk_len, n_chunks = plan_chunks(B, 1, L, x.device)
    # Without slot_sums the partials' pointers are not read: any valid tensor.
    dq_ws, dv_ws = _slot_workspaces(B, n_chunks, S, C, x, cluster, dslots) if slot_sums else (dx, dx)
    _tiled("pixel_bwd", S, C, x.dtype, L)[(B, n_chunks)](
        dx_ptr=dx,
        dq_ptr=dq_ws,
        dv_ptr=dv_ws,
        s0_ptr=init_slots,
        scale_ptr=scale,
        **_strides("ss", init_slots),
        chunk_len=chunk_len,
        SLOT_SUMS=slot_sums,
        NORMALIZE=slot_sums,
        **args,
    )
    if slot_sums:
        return dq_ws, dv_ws

    block_s = pick_config("slot_bwd", S, C, x.dtype).block_s
    chunk_len, n_chunks = plan_chunks(B, S, L, x.device, block_s)
    dq_ws, dv_ws = _slot_workspaces(B, n_chunks, S, C, x, cluster, dslots)
    _tiled("slot_bwd", S, C, x.dtype)[_split_l_grid(B, S, n_chunks, C)](
        dq_ptr=dq_ws, dv_ptr=dv_ws, chunk_len=chunk_len, **args
    )
    return dq_ws, dv_ws


def _slot_workspaces(B, n_chunks, S, C, x, cluster, dslots):
    dq_ws = x.new_empty((B, n_chunks, S, C), dtype=torch.float32)
    if cluster:
        return dq_ws, dq_ws  # no dslots: any valid tensor
    return dq_ws, dslots if n_chunks == 1 else torch.empty_like(dq_ws)


registrations.register(sys.modules[__name__])
