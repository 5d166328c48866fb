"""What the tools around torch need to know about the fused ops, registered once per backend module.

- FLOP formulas (``torch.utils.flop_counter``): each op counts the matrix products the reference
  math runs for it, so ``FlopCounterMode`` gives a fused model the reference's total.
- Decompositions to the reference math, for ``ExportedProgram.run_decompositions``: its default
  table decomposes a custom op only through a CompositeImplicitAutograd kernel, and only when the
  op has no kernel for the tensors' device (torch 2.13), which ours have; so the table comes from
  ``core_aten_decompositions()`` (torch's default table plus these).
"""

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from . import contract

_DECOMPOSITIONS = {}
_REGISTERED = set()


def _overload(op):
    """The ``OpOverload`` of a ``torch.ops`` packet or of a ``torch.library.custom_op``."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default
    return getattr(op, "_opoverload", op)


# Products per (batch, slot, pixel, channel): forward, the logits A = qs k^T and one product with
# them (P x or D^T slots); backward, the two gradients of each of those two products. The
# arguments are the contract's (contract.py): x, then init_slots (B or 1, S, C).
def _forward_flops(x_shape, init_slots_shape, *args, **kwargs):
    B, L, C = x_shape
    return 4 * B * init_slots_shape[1] * L * C


def _backward_flops(grad_shape, x_shape, init_slots_shape, *args, **kwargs):
    B, L, C = x_shape
    return 8 * B * init_slots_shape[1] * L * C


def _logits(x, init_slots, scale):
    """``A = scale * q k^T`` (B, S, L) in the accumulation dtype, as the reference computes it."""
    acc = contract.acc_dtype(x)
    q = F.normalize(init_slots.to(acc), dim=-1)
    k = F.normalize(x.to(acc), dim=-1)
    return scale.to(acc) * (q @ k.transpose(-1, -2))


def _cluster_fwd(x, init_slots, scale):
    a = _logits(x, init_slots, scale)
    lse = a.logsumexp(dim=-1)
    return (a - lse.unsqueeze(-1)).exp() @ x.to(a.dtype), lse


def _dispatch_fwd(x, init_slots, scale, slots):
    a = _logits(x, init_slots, scale)
    lse = a.logsumexp(dim=-2)
    d = (a - lse.unsqueeze(-2)).exp()
    return (d.transpose(-1, -2) @ slots.to(a.dtype)).to(x.dtype), lse


def _update_active_flop_counters(formulas):
    # A FlopCounterMode copies the registry when it is created, and backends load on first use,
    # which may be inside one: give the formulas to those already counting.
    for mode in _get_current_dispatch_mode_stack():
        counter = getattr(mode, "counter", None)
        if isinstance(counter, FlopCounterMode):
            counter.flop_registry.update(formulas)


def register(module):
    """Registers the formulas and decompositions of a backend module's four ops (once per op)."""
    ops = {
        name: _overload(getattr(module, name))
        for name in ("cluster_fwd", "cluster_bwd", "dispatch_fwd", "dispatch_bwd")
    }
    new = {name: op for name, op in ops.items() if op not in _REGISTERED}
    if not new:
        return
    _REGISTERED.update(new.values())
    forward = [op for name, op in new.items() if name.endswith("_fwd")]
    backward = [op for name, op in new.items() if name.endswith("_bwd")]
    # flop_counter wants packets; its registry is keyed by them.
    formulas = {op.overloadpacket: _forward_flops for op in forward}
    formulas.update({op.overloadpacket: _backward_flops for op in backward})
    for packet, formula in formulas.items():
        register_flop_formula(packet)(formula)
    _update_active_flop_counters({packet: flop_counter.flop_registry[packet] for packet in formulas})
    if "cluster_fwd" in new:
        _DECOMPOSITIONS[new["cluster_fwd"]] = _cluster_fwd
    if "dispatch_fwd" in new:
        _DECOMPOSITIONS[new["dispatch_fwd"]] = _dispatch_fwd


def decompositions():
    """``{fused forward op: its reference math}`` for every fused backend loaded so far."""
    return dict(_DECOMPOSITIONS)


def core_aten_decompositions():
    """torch's default export decompositions plus the fused forward ops' reference math:
    ``exported.run_decompositions(core_aten_decompositions())`` leaves core ATen only."""
    from . import BACKENDS, why_unavailable

    for name, b in BACKENDS.items():  # load every usable backend, so its ops are in the table
        if b.load is not None and any(why_unavailable(name, d) is None for d in b.device_types):
            b.load()
    table = torch.export.default_decompositions()
    table.update(_DECOMPOSITIONS)
    return table
