"""What the benchmarks run: GLMix op calls per backend and mode, GLNet inference and training
steps, and mixer variants of one GLNet skeleton.

Op-level backends are the registry's (``reference``, ``cpu``, ``cuda``, ``triton``) plus two
baselines: ``compile`` (``torch.compile`` of the reference) and ``sdpa`` (the same math through
``scaled_dot_product_attention``, the temperature folded into the queries).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import glmix_kernels
from glmix_kernels import reference
from glmix_kernels.backends import BACKENDS, auto_order, resolve, why_unavailable
from glmix_kernels.models import GLMixBlock, create_model

from . import timing

OPS = ("cluster", "dispatch", "cluster+dispatch")
# "fwd" is the forward of a training step (inputs require grad, so autograd records and saves);
# "bwd" the backward alone, its forward run outside the timed call; "full" both.
MODES = ("fwd", "bwd", "full")
BASELINES = ("compile", "sdpa")
OP_BACKENDS = ("reference",) + BASELINES + tuple(n for n in BACKENDS if n != "reference")
NUM_SLOTS = 64
# (channels C, pixels L) of GLMix stages at 224x224 input.
STAGE_SHAPES = {
    "glnet_4g.s1": (64, 3136),
    "glnet_4g.s2": (128, 784),
    "glnet_4g.s3": (256, 196),
    "glnet_4g.s4": (512, 49),  # the smallest L: per-call overhead shows most here
    "glnet_stl.s1": (96, 3136),
    "glnet_9g.s3": (384, 196),
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Workload:
    """``run(*make_inputs())`` is the timed call; ``make_inputs`` draws one fresh input set.
    ``single_use``: a call consumes its set (see ``timing.feed``)."""

    make_inputs: object
    run: object
    single_use: bool = False

    def feed(self, device):
        return timing.feed(self.make_inputs, device, self.single_use)


def skip_reason(backend, device, dtype=torch.float32, channels=1, slots=1):
    """Why op-level ``backend`` is not timed for these inputs on ``device``, or None."""
    if backend in ("reference",) + BASELINES:
        return None
    device_type = torch.device(device).type
    why = why_unavailable(backend, device_type)
    if why is not None:
        return why
    if backend not in auto_order(device_type):  # the Triton interpreter, the CUDA emulation
        return f"{backend} on {device_type} tensors is a correctness tool (auto never picks it), not timed"
    try:  # the registry's own dtype and size limits, checked on an empty tensor of the right kind
        resolve(backend, torch.empty((0, 0, channels), dtype=dtype, device=device), slots)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def model_backends(device):
    """The registry backends a GLNet can be timed with on ``device`` (interpreter excluded)."""
    return [n for n in BACKENDS if skip_reason(n, device) is None]


# ---------------------------------------------------------------- ops


def _sdpa(q, k, v):
    # SDPA's fused kernels want (B, heads, L, E) with unit stride in E: a head axis of one, and a
    # copy of the pixels' NCHW view (stride L in E), which this baseline pays for as a user would.
    # The scale is already in q or k.
    q, k, v = (t.contiguous().unsqueeze(1) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)


def _sdpa_cluster(x, init_slots, scale):
    q = scale.to(x.dtype) * F.normalize(init_slots, dim=-1)
    return _sdpa(q, F.normalize(x, dim=-1), x)


def _sdpa_dispatch(x, init_slots, scale, slots):
    k = scale.to(x.dtype) * F.normalize(init_slots, dim=-1)
    return _sdpa(F.normalize(x, dim=-1), k, slots)


def _fused(backend):
    def cluster(x, init_slots, scale):
        return glmix_kernels.soft_cluster(x, init_slots, scale, backend=backend)

    def dispatch(x, init_slots, scale, slots):
        return glmix_kernels.soft_dispatch(x, init_slots, scale, slots, backend=backend)

    return cluster, dispatch


def _compose(op, cluster, dispatch):
    """``f(x, init_slots, scale, slots)`` for ``op``; ``slots`` is None unless ``op`` is dispatch."""
    if op == "cluster":
        return lambda x, s0, scale, slots: cluster(x, s0, scale)
    if op == "dispatch":
        return lambda x, s0, scale, slots: dispatch(x, s0, scale, slots)
    # The pair as one unit: the slots go straight from clustering to dispatch (the block's
    # slot attention in between is not part of the ops).
    return lambda x, s0, scale, slots: dispatch(x, s0, scale, cluster(x, s0, scale))


_compiled = {}


def _compiled_reference(op, key):
    # One compiled graph per op and input shape, started from a clean dynamo: a sweep over shapes
    # and dtypes would pass dynamo's per-function recompile limit and silently run eager, and
    # after one recompile it would switch to slower dynamic-shape kernels.
    if key not in _compiled:
        torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = torch.compile(_compose(op, reference.soft_cluster, reference.soft_dispatch), dynamic=False)
    return _compiled[key]


def op_function(op, backend, key=None):
    """``f(x, init_slots, scale, slots)`` computing ``op`` with op-level ``backend``.
    ``key`` identifies the input shapes (for ``compile``: one compilation per key)."""
    if backend == "compile":
        return _compiled_reference(op, key)
    if backend == "sdpa":
        return _compose(op, _sdpa_cluster, _sdpa_dispatch)
    if backend == "reference":
        return _compose(op, reference.soft_cluster, reference.soft_dispatch)
    return _compose(op, *_fused(backend))


def op_inputs(op, B, L, C, S, dtype, device):
    """Fresh random leaves ``(x_map, init_slots_map, scale, slots, grad_out)`` laid out as in GLNet.

    ``x_map`` is ``(B, C, L)``, an NCHW map; the op sees it as ``(B, L, C)`` (strides
    ``(C*L, 1, L)``, no copy), like the model's ``norm1`` output. ``init_slots_map`` likewise
    ``(B, C, S)``, as pooled slots are. ``slots`` is None unless ``op`` is dispatch. Never zeros:
    a zero input would make normalisation and softmax degenerate.
    """

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()

    # A trained temperature is well above its C**-0.5 start; a peaky softmax is the realistic case.
    scale = (4.0 + 4.0 * torch.rand((), device=device)).requires_grad_()
    slots = leaf(B, S, C) if op == "dispatch" else None
    grad_out = torch.randn(B, S if op == "cluster" else L, C, dtype=dtype, device=device)
    return leaf(B, C, L), leaf(B, C, S), scale, slots, grad_out


def op_forward(f, x_map, s0_map, scale, slots):
    return f(x_map.transpose(1, 2), s0_map.transpose(1, 2), scale, slots)


def _grads(out, leaves, grad_out):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)


def op_workload(op, backend, mode, B, L, C, S, dtype, device):
    """The timed call for ``op`` with op-level ``backend`` in ``mode`` at shape ``(B, L, C, S)``."""
    f = op_function(op, backend, key=(op, B, L, C, S, dtype, str(device)))

    def make_leaves():
        return op_inputs(op, B, L, C, S, dtype, device)

    if mode == "fwd":
        return Workload(make_leaves, lambda x, s0, scale, slots, g: op_forward(f, x, s0, scale, slots))
    if mode == "full":

        def full(x, s0, scale, slots, g):
            return _grads(op_forward(f, x, s0, scale, slots), (x, s0, scale, slots), g)

        return Workload(make_leaves, full)
    if mode == "bwd":

        def recorded_forward():
            x, s0, scale, slots, g = make_leaves()
            return op_forward(f, x, s0, scale, slots), (x, s0, scale, slots), g

        # Each set's backward runs once: retaining graphs to time them again would not work
        # with torch.compile's donated buffers, and would time a backward that frees nothing.
        return Workload(recorded_forward, _grads, single_use=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def reference_error(op, backend, B, L, C, S, dtype, device):
    """Largest normwise error ``max|a - e| / max|e|`` of ``backend``'s output and gradients against
    the reference computed in float32 on the same (rounded) inputs.

    ``d scale`` is one sum over every output element, ``sum(grad_out * d out / d scale)``; random
    data can make it cancel to almost nothing, and then the float32 reference's own rounding is
    large relative to it. Its error is taken relative to the larger of its value and the root sum
    of squares of its terms, the size such a sum has when its terms' signs are random.
    """
    x, s0, scale, slots, g = op_inputs(op, B, L, C, S, dtype, device)
    f = op_function(op, backend, key=(op, B, L, C, S, dtype, str(device)))
    leaves = (x, s0, scale, slots)
    out = op_forward(f, *leaves)
    actual = (out,) + _grads(out, leaves, g)

    exact = [t.detach().float().requires_grad_() if t is not None else None for t in leaves]
    ref = op_function(op, "reference")
    out32 = op_forward(ref, *exact)
    expected = (out32,) + _grads(out32, exact, g.float())
    scales = [e.abs().max() for e in expected]
    ds = 3  # expected = (out, dx, d init_slots, d scale[, d slots])
    scales[ds] = torch.maximum(scales[ds], (g.float() * _scale_tangent(ref, *exact)).norm())
    return max(((a.float() - e).abs().max() / m.clamp_min(1e-12)).item() for a, e, m in zip(actual, expected, scales))


def _scale_tangent(f, x_map, s0_map, scale, slots):
    """``d out / d scale``, by forward-mode differentiation (one more forward of ``f``)."""
    x_map, s0_map, scale = x_map.detach(), s0_map.detach(), scale.detach()
    slots = slots.detach() if slots is not None else None
    _, tangent = torch.func.jvp(lambda s: op_forward(f, x_map, s0_map, s, slots), (scale,), (torch.ones_like(scale),))
    return tangent


# ---------------------------------------------------------------- models


def autocast(device, dtype):
    """Mixed precision in ``dtype`` for half dtypes; float32 runs as it is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def image_batch(batch, resolution, device, num_classes=1000):
    """Random images (never zeros) and labels."""
    return (
        torch.randn(batch, 3, resolution, resolution, device=device),
        torch.randint(num_classes, (batch,), device=device),
    )


def model_workload(model, mode, batch, resolution, dtype, device):
    """``mode`` "infer": a forward without autograd; "train": zero_grad, forward, cross-entropy,
    backward and an AdamW step. Builds the optimizer for "train"."""
    model.to(device)
    if mode == "infer":
        model.eval()

        def infer(images, labels):
            with torch.inference_mode(), autocast(device, dtype):
                return model(images)

        return Workload(lambda: image_batch(batch, resolution, device), infer)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(images, labels):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss

        return Workload(lambda: image_batch(batch, resolution, device), step)
    raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")


# ---------------------------------------------------------------- mixer comparison

# One skeleton for every variant: glnet_stl's, whose three first stages are pure GLMix, so the
# variants differ in exactly those blocks (its last stage stays plain attention throughout).
MIXER_SKELETON = "glnet_stl"
MIXER_ATTENTION, MIXER_LOCAL = "mha_nchw", "local"


def build_mixer_model(variant, **kwargs):
    """The ``MIXER_SKELETON`` GLNet with its GLMix stages run as ``variant``: a backend name (GLMix
    on those ops), ``"mha_nchw"`` (full attention) or ``"local"`` (the local branch alone)."""
    if variant == MIXER_ATTENTION:
        return create_model(MIXER_SKELETON, mixing_modes=("mha_nchw",) * 3 + ("mha",), **kwargs)
    if variant == MIXER_LOCAL:
        model = create_model(MIXER_SKELETON, backend="reference", **kwargs)
        for block in model.modules():
            if isinstance(block, GLMixBlock):
                block.use_global_branch = False
        return model
    return create_model(MIXER_SKELETON, backend=variant, **kwargs)
