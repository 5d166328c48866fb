"""The two ops ``torch.export`` records for ``soft_cluster`` and ``soft_dispatch``: one node each.

A fused backend's kernel ops have device kernels, and torch's export decompositions lower a custom
op by default only through a CompositeImplicitAutograd kernel, and only when the op has no kernel
for the tensors' device (torch 2.13). So while exporting, the public functions call these two
composite ops instead; they name the backend as an argument. Run (``ep.module()``), they call the
backend through the autograd Functions; decomposed (``ep.run_decompositions()``, the ONNX exporter)
they become the reference math, core ATen only.
"""

import torch

from . import reference
from ._autograd import ClusterFn, DispatchFn

_LIB = torch.library.Library("glmix", "DEF")
_LIB.define("soft_cluster(Tensor x, Tensor init_slots, Tensor scale, str backend) -> Tensor")
_LIB.define("soft_dispatch(Tensor x, Tensor init_slots, Tensor scale, Tensor slots, str backend) -> Tensor")


# export calls the composite kernel to decompose the op and to find its output's shape; a run of
# the exported program calls it to compute.
def _soft_cluster(x, init_slots, scale, backend):
    if torch.compiler.is_exporting():
        return reference.soft_cluster(x, init_slots, scale)
    return ClusterFn.apply(x, init_slots, scale, backend)


def _soft_dispatch(x, init_slots, scale, slots, backend):
    if torch.compiler.is_exporting():
        return reference.soft_dispatch(x, init_slots, scale, slots)
    return DispatchFn.apply(x, init_slots, scale, slots, backend)


_LIB.impl("soft_cluster", _soft_cluster, "CompositeImplicitAutograd")
_LIB.impl("soft_dispatch", _soft_dispatch, "CompositeImplicitAutograd")

soft_cluster = torch.ops.glmix.soft_cluster
soft_dispatch = torch.ops.glmix.soft_dispatch
