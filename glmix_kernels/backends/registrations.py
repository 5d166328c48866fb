"""What the tools around torch need to know about the fused ops, registered once per backend module:
FLOP formulas (``torch.utils.flop_counter``). Each op counts the matrix products the reference
math runs for it, so ``FlopCounterMode`` gives a fused model the reference's total. (Export and its
decompositions go through ``glmix_kernels._export``.)
"""

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

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


def _update_active_flop_counters(formulas):
    # A FlopCounterMode copies the registry when it is created, and backends load on first use,
    # which may be inside one: give the formulas to those already counting.
    for mode in _get_current_dispatch_mode_stack():
        counter = getattr(mode, "counter", None)
        if isinstance(counter, FlopCounterMode):
            counter.flop_registry.update(formulas)


def register(module):
    """Registers the FLOP formulas of a backend module's four ops (once per op)."""
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
