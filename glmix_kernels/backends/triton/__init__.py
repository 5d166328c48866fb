"""The ``"triton"`` backend: the four kernels as torch.library ops ``glmix_triton::*``.

Launch plan (kernels in ``kernels.py``):

- ``cluster_fwd``: ``cluster_fwd_partial`` over (batch x slot block, L chunk, C block) writes
  per-chunk online-softmax partials, ``cluster_fwd_combine`` merges them by log-sum-exp into fp32
  slots (the autograd Function rounds them to x's dtype; ``cluster_bwd`` reads them as they are).
- ``dispatch_fwd``: ``dispatch_fwd`` over (batch x pixel tile); a tile holds all S slots.
- ``*_bwd``: ``pixel_bwd`` writes ``dx`` per pixel tile; ``reduce_bwd`` writes per-chunk partial
  sums over L of ``dqs`` (and ``dslots``), which ``sum_chunks`` adds up in chunk order, so results
  are bitwise reproducible without atomics.

No ``(B, S, L)`` tensor exists anywhere; the workspaces are ``O(B * chunks * S * C)``.
On CPU tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``).
"""
import functools
import sys

import torch
import triton

from .. import contract, registrations
from . import kernels

# Slot rows per program of the reduction kernels (they keep a (BLOCK_S, BLOCK_C) accumulator).
_MAX_BLOCK_S = 64
_SUM_BLOCK = 1024


def _block(n, cap):
    return max(16, min(cap, triton.next_power_of_2(n)))  # tl.dot needs 16 per side


@functools.lru_cache(maxsize=None)
def _programs_wanted(device):
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: enough chunks that the split-L path runs at test sizes


def split_plan(B, S, L, device):
    """``(BLOCK_S, slot blocks, chunk_len, chunks)`` of the reduction kernels.

    Depends only on the shape and device (not on the autotuned config), so the chunks and their
    order are fixed for a shape; the rounding inside a chunk follows the autotuned tile sizes,
    which a new process may choose differently on a GPU.
    """
    block_s = _block(S, _MAX_BLOCK_S)
    n_sb = triton.cdiv(S, block_s)
    quanta = triton.cdiv(L, kernels.CHUNK_QUANTUM)
    chunks_wanted = max(1, min(quanta, triton.cdiv(_programs_wanted(device), B * n_sb)))
    chunk_len = triton.cdiv(quanta, chunks_wanted) * kernels.CHUNK_QUANTUM
    return block_s, n_sb, chunk_len, triton.cdiv(L, chunk_len)


def _upcast(x):
    return kernels.INTERPRET and x.dtype == torch.bfloat16


def _reduce_grid(B, n_sb, n_chunks, C):
    return lambda meta: (B * n_sb, n_chunks, triton.cdiv(C, meta["BLOCK_C"]))


def _pixel_grid(B, L):
    return lambda meta: (B * triton.cdiv(L, meta["BLOCK_L"]),)


def _sum_chunks(ws, out):
    """``out`` (B, S, C) = ``ws`` (B, chunks, S, C) summed over chunks."""
    B, n_chunks, S, C = ws.shape
    _launch(kernels.sum_chunks)[(B * triton.cdiv(S * C, _SUM_BLOCK),)](
        ws, out, n_chunks, S * C, BLOCK=_SUM_BLOCK)


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


def _cluster_fwd(x, qs, slots, lse):
    B, L, C = x.shape
    S = qs.shape[1]
    block_s, n_sb, chunk_len, n_chunks = split_plan(B, S, L, x.device)
    m_ws = x.new_empty((B, n_chunks, S), dtype=torch.float32)
    l_ws = torch.empty_like(m_ws)
    acc_ws = x.new_empty((B, n_chunks, S, C), dtype=torch.float32)
    _launch(kernels.cluster_fwd_partial)[_reduce_grid(B, n_sb, n_chunks, C)](
        x, qs, m_ws, l_ws, acc_ws, S, L, C, chunk_len, *x.stride(), *qs.stride(),
        BLOCK_S=block_s, UPCAST=_upcast(x))
    block_c = _block(C, 128)
    _launch(kernels.cluster_fwd_combine)[(B * n_sb, triton.cdiv(C, block_c))](
        m_ws, l_ws, acc_ws, slots, lse, S, C, n_chunks, BLOCK_S=block_s, BLOCK_C=block_c)


def _dispatch_fwd(x, qs, slots, out, lse):
    B, L, C = x.shape
    S = qs.shape[1]
    _launch(kernels.dispatch_fwd)[_pixel_grid(B, L)](
        x, qs, slots, out, lse, S, L, C, *x.stride(), *qs.stride(), *slots.stride(),
        BLOCK_S=_block(S, 256), UPCAST=_upcast(x))


def _backward(cluster, grad, x, qs, slots, lse, dx, dqs, dslots):
    """Both backwards into ``dx``, ``dqs`` (and dispatch's ``dslots``); ``slots`` is clustering's
    fp32 forward result or dispatch's values.
    """
    B, L, C = x.shape
    S = qs.shape[1]
    # dispatch's delta' = sum_s D dD per pixel, from pixel_bwd (whose tile holds all S slots) to
    # reduce_bwd; clustering computes its per-slot delta in place and gets a dummy (any valid
    # pointer)
    delta = lse if cluster else x.new_empty((B, L), dtype=torch.float32)
    args = (x, qs, grad, slots, lse)
    strides = (*x.stride(), *qs.stride(), *grad.stride(), *slots.stride())
    _launch(kernels.pixel_bwd)[_pixel_grid(B, L)](
        *args, dx, delta, S, L, C, *strides,
        CLUSTER=cluster, BLOCK_S=_block(S, 256), UPCAST=_upcast(x))

    block_s, n_sb, chunk_len, n_chunks = split_plan(B, S, L, x.device)
    dq_ws = x.new_empty((B, n_chunks, S, C), dtype=torch.float32)
    dv_ws = dq_ws if cluster else torch.empty_like(dq_ws)
    _launch(kernels.reduce_bwd)[_reduce_grid(B, n_sb, n_chunks, C)](
        *args, delta, dq_ws, dv_ws, S, L, C, chunk_len, *strides,
        CLUSTER=cluster, BLOCK_S=block_s, UPCAST=_upcast(x))
    _sum_chunks(dq_ws, dqs)
    if not cluster:
        _sum_chunks(dv_ws, dslots)


# ---------------------------------------------------------------- the ops of the contract
# An adapter until the kernels normalise the queries themselves: qs = scale * normalize(init_slots)
# by a few torch ops around the launchers above, and their backward after them (contract.py).

def _queries(x, init_slots, scale):
    """qs (B, S, C) in float32: normalised in fp64, rounded, scaled, broadcast."""
    s = init_slots.to(torch.float64, memory_format=torch.contiguous_format)
    q = (s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()
    return (scale.float() * q).expand(x.shape[0], -1, -1)


def _queries_backward(dqs, init_slots, scale, d_init_slots, dscale):
    """Writes ``d init_slots`` (summed over a broadcast batch) and ``dscale`` from ``dqs``, in fp64."""
    s = init_slots.to(torch.float64, memory_format=torch.contiguous_format)
    r = s.norm(dim=-1, keepdim=True)
    q = s / r.clamp_min(1e-12)
    dq = dqs.double().sum(0, keepdim=True) if init_slots.shape[0] != dqs.shape[0] else dqs.double()
    dscale.copy_((dq * q).sum())
    dq = dq * scale.double()
    proj = q * ((q * dq).sum(-1, keepdim=True) * (r >= 1e-12))  # the clamp passes no gradient
    d_init_slots.copy_((dq - proj) / r.clamp_min(1e-12))


@_op("cluster_fwd", contract.cluster_fwd_outputs)
def cluster_fwd(x: torch.Tensor, init_slots: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    slots, lse = contract.cluster_fwd_outputs(x, init_slots, scale)
    _cluster_fwd(x, _queries(x, init_slots, scale), slots, lse)
    return slots, lse


@_op("cluster_bwd", contract.cluster_bwd_outputs)
def cluster_bwd(grad: torch.Tensor, x: torch.Tensor, init_slots: torch.Tensor, scale: torch.Tensor,
                slots: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, d_init_slots, dscale = contract.cluster_bwd_outputs(grad, x, init_slots, scale, slots, lse)
    qs = _queries(x, init_slots, scale)
    dqs = x.new_empty(qs.shape, dtype=torch.float32)
    _backward(True, grad, x, qs, slots, lse, dx, dqs, None)
    _queries_backward(dqs, init_slots, scale, d_init_slots, dscale)
    return dx, d_init_slots, dscale


@_op("dispatch_fwd", contract.dispatch_fwd_outputs)
def dispatch_fwd(x: torch.Tensor, init_slots: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = contract.dispatch_fwd_outputs(x, init_slots, scale, slots)
    _dispatch_fwd(x, _queries(x, init_slots, scale), slots, out, lse)
    return out, lse


@_op("dispatch_bwd", contract.dispatch_bwd_outputs)
def dispatch_bwd(grad: torch.Tensor, x: torch.Tensor, init_slots: torch.Tensor, scale: torch.Tensor,
                 slots: torch.Tensor, lse: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, d_init_slots, dscale, dslots = contract.dispatch_bwd_outputs(grad, x, init_slots, scale, slots, lse)
    qs = _queries(x, init_slots, scale)
    dqs = x.new_empty(qs.shape, dtype=torch.float32)
    _backward(False, grad, x, qs, slots, lse, dx, dqs, dslots)
    _queries_backward(dqs, init_slots, scale, d_init_slots, dscale)
    return dx, d_init_slots, dscale, dslots
# ---------------------------------------------------------------- end of the contract adapter


registrations.register(sys.modules[__name__])
