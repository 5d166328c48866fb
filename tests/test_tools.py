"""The fused ops under the tools people measure and ship models with: FLOP counting, the profiler,
torch.export (and its decomposition to core ATen), ONNX through onnxruntime, and a check that no
op reads a tensor's value on the host."""

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import glmix_kernels
from _helpers import FUSED, OpLog
from glmix_kernels.backends import BACKENDS, why_unavailable
from glmix_kernels.models import GLMixBlock, create_model
from test_models import tiny

FUSED_CPU = [n for n in FUSED if "cpu" in BACKENDS[n].device_types]


def require_cpu(backend):
    why = why_unavailable(backend, "cpu")
    if why is not None:
        pytest.skip(f"backend {backend!r} on cpu: {why}")


def op_inputs(B=2, L=37, C=24, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g, requires_grad=True)
    init_slots = torch.randn(1, S, C, generator=g, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    return x, init_slots, scale


def both_ops(backend, x, init_slots, scale):
    slots = glmix_kernels.soft_cluster(x, init_slots, scale, backend=backend)
    return glmix_kernels.soft_dispatch(x, init_slots, scale, slots, backend=backend)


# ---------------------------------------------------------------- FLOPs


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_op_flops_equal_the_references(backend):
    require_cpu(backend)
    x, init_slots, scale = op_inputs()
    want = count_flops(lambda: both_ops("reference", x, init_slots, scale).sum().backward())
    got = count_flops(lambda: both_ops(backend, x, init_slots, scale).sum().backward())
    assert want == got == 3 * 8 * 2 * 9 * 37 * 24  # forward 4 + backward 8 per op, per B*S*L*C


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_glnet_flops_equal_the_references(backend, train):
    """glnet_4g (one or two blocks of each kind) at 224x224 on fake tensors: the counts need
    shapes only."""
    if BACKENDS[backend].load is None or why_unavailable(backend, "cpu") is not None:
        pytest.skip(f"backend {backend!r} cannot be loaded here: {why_unavailable(backend, 'cpu')}")
    counts = {}
    model = create_model("glnet_4g", depth=[1, 1, 2, 1]).train(train)
    for name in ("reference", backend):
        model.set_backend(name)
        with FakeTensorMode(allow_non_fake_inputs=True):  # the parameters become fake on use
            x = torch.randn(1, 3, 224, 224)
            counts[name] = count_flops(lambda x=x: model(x).sum().backward() if train else model(x))
    assert counts[backend] == counts["reference"]
    glmix = 4 * 2 * 64 * (2 * 3136 * 64 + 784 * 128 + 196 * 256)  # the GLMix blocks' forward products
    assert counts["reference"] > glmix * (3 if train else 1)


# ---------------------------------------------------------------- profiler


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_ops_show_in_the_profiler_under_their_names(backend):
    require_cpu(backend)
    x, init_slots, scale = op_inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        both_ops(backend, x, init_slots, scale).sum().backward()
    names = {e.name for e in prof.events()}
    module = BACKENDS[backend].load()
    for op in ("cluster_fwd", "cluster_bwd", "dispatch_fwd", "dispatch_bwd"):
        qualname = _qualname(getattr(module, op))
        assert qualname in names, f"{qualname} not among the profiled events"


def _qualname(op):
    overload = op.default if isinstance(op, torch._ops.OpOverloadPacket) else op._opoverload
    return overload._schema.name  # e.g. "glmix_kernels::cluster_fwd"


# ---------------------------------------------------------------- no host synchronisation

# Operators that copy a tensor's value to the host (on a GPU: a synchronisation, which also
# breaks CUDA graph capture).
HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::equal",
    "aten::allclose",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::tolist",
}


def host_reads(fn):
    """The host-reading operators ``fn`` dispatches, nested ones included (the profiler records
    every operator the dispatcher runs, also those a C++ kernel calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events()} & HOST_READS)


def test_host_read_check_catches_a_read():
    x = torch.randn(4)
    assert host_reads(lambda: x.sum().item()) == ["aten::_local_scalar_dense", "aten::item"]
    assert "aten::is_nonzero" in host_reads(lambda: bool(x.sum() > 0))
    assert host_reads(lambda: x * 2) == []


@pytest.mark.parametrize("backend", ["reference"] + FUSED_CPU)
def test_ops_never_read_tensor_values_on_the_host(backend):
    require_cpu(backend)
    x, init_slots, scale = op_inputs()
    # Warm up outside the check: the first call may load kernels.
    both_ops(backend, x, init_slots, scale).sum().backward()
    slots = glmix_kernels.soft_cluster(x, init_slots, scale, backend=backend).detach().requires_grad_()
    out = glmix_kernels.soft_dispatch(x, init_slots, scale, slots, backend=backend)
    for what, fn in [
        ("cluster forward", lambda: glmix_kernels.soft_cluster(x, init_slots, scale, backend=backend)),
        ("dispatch forward", lambda: glmix_kernels.soft_dispatch(x, init_slots, scale, slots, backend=backend)),
        ("dispatch backward", lambda: out.sum().backward(retain_graph=True)),
        ("both, forward and backward", lambda: both_ops(backend, x, init_slots, scale).sum().backward()),
    ]:
        assert host_reads(fn) == [], f"{backend} {what} reads tensor values on the host"


# ---------------------------------------------------------------- torch.export


EXPORTED_OPS = {"glmix.soft_cluster.default", "glmix.soft_dispatch.default"}


def call_targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def kernel_ops(backend):
    """The packet names (as ``OpLog`` records them) of the backend's two forward kernel ops."""
    module = BACKENDS[backend].load()
    return {_qualname(getattr(module, op)).replace("::", ".") for op in ("cluster_fwd", "dispatch_fwd")}


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_export_keeps_the_ops_as_single_nodes_and_decomposes_to_core_aten(backend):
    require_cpu(backend)
    model = tiny("hybrid").eval()
    reference = copy.deepcopy(model).set_backend("reference")
    model.set_backend(backend)
    x = torch.randn(2, 3, 45, 61)
    ep = torch.export.export(model, (x,))
    n_glmix = sum(isinstance(m, GLMixBlock) for m in model.modules())
    nodes = [n for n in ep.graph.nodes if str(n.target) in EXPORTED_OPS]
    assert len(nodes) == 2 * n_glmix, call_targets(ep)  # one clustering and one dispatch per block
    assert {n.args[-1] for n in nodes} == {backend}
    with torch.no_grad(), OpLog() as ran:
        got = ep.module()(x)
    assert kernel_ops(backend) <= set(ran.ops), "the exported program should run the fused kernels"
    with torch.no_grad():
        want = reference(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    core = ep.run_decompositions()  # torch's default table
    table = torch.export.default_decompositions()
    for node in core.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            assert node.target.namespace == "aten", f"{node.target} is not an ATen op"
            # Core ATen, or an op torch's own table keeps (linalg_vector_norm, runtime assertions).
            assert torch.Tag.core in node.target.tags or node.target not in table, (
                f"{node.target} should have been decomposed"
            )
    assert not set(call_targets(core)) & EXPORTED_OPS
    with torch.no_grad():
        torch.testing.assert_close(core.module()(x), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- ONNX

# onnxruntime's logits against the reference backend's eager ones: normwise (max |err| / max |logit|).
ONNX_TOL = 1e-4


def onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        pytest.skip(f"ONNX export needs onnx, onnxruntime and onnxscript ({e}); `pip install -e .[export]`")
    return onnx, onnxruntime


def dynamic_image_dims():
    """Any batch, height and width: the slots' pooling is written with symbolic sizes under export."""
    return {0: torch.export.Dim("batch", min=1, max=256), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}


# glnet_4g with one or two blocks of each kind, and at its full depth (4-4-18-4), each exported
# once per run, at the smallest image that keeps every stage's map sizes symbolic (the last
# stage's map needs two rows and columns). The full depth skips the ONNX optimiser, whose passes
# take over 20 minutes at that size (the reduced depth runs them); its export takes about a minute.
ONNX_DEPTHS = {"depth-1-1-2-1": [1, 1, 2, 1], "full-depth": None}


@pytest.fixture(scope="module", params=list(ONNX_DEPTHS))
def glnet_4g_onnx(request, tmp_path_factory):
    """(path of the ONNX file of glnet_4g on the cpu backend, the model on the reference backend)."""
    onnx_modules()
    require_cpu("cpu")
    depth = ONNX_DEPTHS[request.param]
    torch.manual_seed(0)
    model = create_model("glnet_4g", backend="cpu", **({} if depth is None else {"depth": depth})).eval()
    reference = copy.deepcopy(model).set_backend("reference")
    ep = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=(dynamic_image_dims(),))
    program = torch.onnx.export(ep, dynamo=True, optimize=depth is not None)
    path = tmp_path_factory.mktemp("onnx") / f"glnet_4g-{request.param}.onnx"
    program.save(str(path))
    return path, reference


def test_onnx_model_has_standard_operators_and_dynamic_sizes(glnet_4g_onnx):
    onnx, _ = onnx_modules()
    proto = onnx.load(str(glnet_4g_onnx[0]))
    onnx.checker.check_model(proto)
    domains = {n.domain for n in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard operator domains: {domains}"
    shape = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert shape[1] == 3 and all(isinstance(shape[i], str) for i in (0, 2, 3)), shape


def test_onnx_model_runs_in_onnxruntime_at_other_batches_and_sizes(glnet_4g_onnx):
    _, onnxruntime = onnx_modules()
    path, reference = glnet_4g_onnx
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Neither the traced batch nor the traced size; odd sizes, and maps not divisible by the 8x8
    # slot grid (uneven, overlapping pooling cells).
    for size in [(1, 3, 64, 80), (3, 3, 97, 75)]:
        x = torch.randn(size, generator=torch.Generator().manual_seed(sum(size)))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = reference(x)
        assert got.shape == tuple(want.shape)
        err = ((torch.from_numpy(got) - want).abs().max() / want.abs().max()).item()
        assert err < ONNX_TOL, f"{size}: normwise error {err:.2e}"


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_export_with_dynamic_batch_and_image_size(backend):
    require_cpu(backend)
    model = tiny("hybrid").eval()
    reference = copy.deepcopy(model).set_backend("reference")
    ep = torch.export.export(
        model.set_backend(backend), (torch.randn(2, 3, 45, 61),), dynamic_shapes=(dynamic_image_dims(),)
    )
    core = ep.run_decompositions()
    for size in [(1, 3, 97, 131), (3, 3, 64, 40)]:
        x = torch.randn(size)
        with torch.no_grad():
            want = reference(x)
            torch.testing.assert_close(ep.module()(x), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(core.module()(x), want, rtol=1e-4, atol=1e-5)
