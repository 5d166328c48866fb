"""The public API: backend choice and every input rule, each error naming its argument."""

import os

import pytest
import torch

import glmix_kernels
from glmix_kernels.backends import BACKENDS, why_unavailable

B, L, C, S = 2, 10, 8, 4


def good():
    return dict(
        x=torch.randn(B, L, C), init_slots=torch.randn(1, S, C), scale=torch.tensor(2.0), slots=torch.randn(B, S, C)
    )


def call(op, **changes):
    args = good()
    args.update(changes)
    if op == "cluster":
        args.pop("slots")
        return glmix_kernels.soft_cluster(**args)
    return glmix_kernels.soft_dispatch(**args)


BAD = [  # (argument, bad value, exception, words the message must hold)
    ("x", torch.randn(B, L), ValueError, "(B, L, C)"),
    ("x", torch.randn(B, L, C).numpy(), TypeError, "torch.Tensor"),
    ("x", torch.randint(0, 5, (B, L, C)), TypeError, "floating"),
    ("x", torch.randn(B, L, C, dtype=torch.float64), TypeError, "same dtype"),  # init_slots is fp32
    ("x", torch.randn(0, L, C), ValueError, "B >= 1"),
    ("x", torch.randn(B, L, C).to_sparse(), ValueError, "dense (strided)"),
    ("init_slots", torch.randn(S, C), ValueError, "(B, S, C)"),
    ("init_slots", torch.randn(3, S, C), ValueError, "init_slots must have shape"),
    ("init_slots", torch.randn(1, S, C + 1), ValueError, "init_slots must have shape"),
    ("init_slots", torch.randn(1, 0, C), ValueError, "S >= 1"),
    ("init_slots", torch.randn(1, S, C).half(), TypeError, "init_slots must have the same dtype"),
    ("init_slots", torch.randn(1, S, C, device="meta"), ValueError, "init_slots must be on the same device"),
    ("scale", torch.ones(2), ValueError, "scale must be a 0-d"),
    ("scale", torch.tensor(2), TypeError, "scale must have"),
    ("scale", torch.tensor(2.0, dtype=torch.float64), TypeError, "scale must have"),
    ("scale", torch.tensor(2.0, device="meta"), ValueError, "scale must be on the same device"),
    ("scale", "2.0", TypeError, "scale must be"),
    ("scale", True, TypeError, "scale must be"),
    ("backend", "nope", ValueError, "backend must be 'auto' or one of"),
]
DISPATCH_BAD = [
    ("slots", torch.randn(B, S + 1, C), ValueError, "slots must have shape (2, 4, 8)"),
    ("slots", torch.randn(1, S, C), ValueError, "slots must have shape (2, 4, 8)"),
    ("slots", torch.randn(B, S), ValueError, "slots must be of shape"),
    ("slots", torch.randn(B, S, C).bfloat16(), TypeError, "slots must have the same dtype"),
    ("slots", torch.randn(B, S, C, device="meta"), ValueError, "slots must be on the same device"),
]


@pytest.mark.parametrize(
    "op,arg,value,exc,words",
    [("cluster",) + b for b in BAD] + [("dispatch",) + b for b in BAD + DISPATCH_BAD],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None,
)
@pytest.mark.parametrize("backend", ["auto"] + list(BACKENDS))
def test_bad_input_raises_naming_the_argument(backend, op, arg, value, exc, words):
    """Inputs are checked before any backend is chosen, so every backend answers alike."""
    changes = {"backend": backend, arg: value}
    with pytest.raises(exc) as info:
        call(op, **changes)
    message = str(info.value)
    assert arg in message and words in message, message


def test_clustering_needs_pixels_dispatch_does_not():
    with pytest.raises(ValueError, match="x must have at least one pixel"):
        call("cluster", x=torch.randn(B, 0, C))
    out = call("dispatch", x=torch.randn(B, 0, C))
    assert out.shape == (B, 0, C)


@pytest.mark.parametrize("scale", [2.0, 2, torch.tensor([2.0]), torch.tensor(2.0)])
def test_scale_forms_agree(scale):
    args = good()
    ref = glmix_kernels.soft_cluster(args["x"], args["init_slots"], torch.tensor(2.0))
    torch.testing.assert_close(glmix_kernels.soft_cluster(args["x"], args["init_slots"], scale), ref)


def test_available_backends():
    cpu = glmix_kernels.available_backends("cpu")
    assert cpu[0] == "reference" and set(cpu) <= set(BACKENDS)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1" and why_unavailable("triton", "cpu") is None
    assert ("triton" in cpu) == interpreting
    assert "cuda" not in cpu
    assert glmix_kernels.available_backends(torch.device("cpu")) == cpu


def test_unavailable_backend_lists_the_available_ones():
    with pytest.raises(ValueError) as info:
        call("cluster", backend="cuda")  # CPU tensors: never available
    assert "backend 'cuda' is not available for cpu tensors" in str(info.value)
    assert str(glmix_kernels.available_backends("cpu")) in str(info.value)


@pytest.mark.parametrize("name", [n for n in BACKENDS if torch.float64 not in BACKENDS[n].dtypes])
def test_backend_without_fp64_says_so(name):
    if why_unavailable(name, "cpu") is not None:
        pytest.skip(f"{name} not available on cpu")
    with pytest.raises(TypeError, match=f"backend '{name}' does not support dtype torch.float64 of x"):
        glmix_kernels.soft_cluster(torch.randn(B, L, C).double(), torch.randn(1, S, C).double(), 2.0, backend=name)


def test_auto_never_picks_the_interpreter():
    from glmix_kernels.backends import resolve

    assert resolve("auto", torch.randn(B, L, C), S).name in ("cpu", "reference")


def test_auto_falls_back_past_a_backend_that_cannot_take_the_inputs(monkeypatch):
    """A fused backend whose limits the inputs exceed is skipped for the next in line."""
    import dataclasses

    from glmix_kernels import backends

    if "cpu" not in glmix_kernels.available_backends("cpu"):
        pytest.skip("the C++ extension is not built: no fused backend to fall back from")
    x, many = torch.randn(B, L, C), torch.randn(1, 300, C)
    assert backends.resolve("auto", x, 300).name == "cpu"
    monkeypatch.setitem(backends.BACKENDS, "cpu", dataclasses.replace(backends.BACKENDS["cpu"], max_slots=256))
    assert backends.resolve("auto", x, 300).name == "reference"
    with pytest.raises(ValueError, match="backend 'cpu' supports at most 256 slots, init_slots has 300"):
        glmix_kernels.soft_cluster(x, many, 2.0, backend="cpu")
    torch.testing.assert_close(
        glmix_kernels.soft_cluster(x, many, 2.0), glmix_kernels.reference.soft_cluster(x, many, torch.tensor(2.0))
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_auto_warns_once_when_it_falls_back_to_the_reference(monkeypatch, compiled):
    """The fallback's (B, S, L) memory is said once per reason, as a warning users can filter."""
    import dataclasses
    import warnings

    from glmix_kernels import backends

    if "cpu" not in glmix_kernels.available_backends("cpu"):
        pytest.skip("the C++ extension is not built: no fused backend to fall back from")
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setitem(backends.BACKENDS, "cpu", dataclasses.replace(backends.BACKENDS["cpu"], max_slots=S - 1))
    cluster = glmix_kernels.soft_cluster
    if compiled:
        torch._dynamo.reset()
        cluster = torch.compile(cluster, fullgraph=True, backend="eager")
    x, init = torch.randn(B, L, C), torch.randn(1, S, C)
    with pytest.warns(
        glmix_kernels.GLMixFallbackWarning,
        match=f"runs the reference.*backend 'cpu' supports at most {S - 1} slots, init_slots has {S}",
    ):
        out = cluster(x, init, 2.0)
    torch.testing.assert_close(out, glmix_kernels.reference.soft_cluster(x, init, torch.tensor(2.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call with the same reason says nothing
        glmix_kernels.soft_cluster(x, init, 2.0)
        glmix_kernels.soft_dispatch(x, init, 2.0, torch.randn(B, S, C))
        glmix_kernels.soft_cluster(x, torch.randn(1, S - 1, C), 2.0)  # no fallback, no warning
    with pytest.warns(glmix_kernels.GLMixFallbackWarning, match=f"init_slots has {S + 1}"):  # another reason
        glmix_kernels.soft_cluster(x, torch.randn(1, S + 1, C), 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    args = good()
    with torch.autocast("cpu", dtype=dtype):
        slots = glmix_kernels.soft_cluster(args["x"], args["init_slots"], args["scale"])
        out = glmix_kernels.soft_dispatch(args["x"], args["init_slots"], args["scale"], slots)
    assert slots.dtype == dtype and out.dtype == dtype


def test_autocast_leaves_float64_alone():
    """Like PyTorch's own autocast, which casts only lower-precision-eligible (not fp64) inputs."""
    args = {k: v.double() for k, v in good().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert glmix_kernels.soft_cluster(args["x"], args["init_slots"], args["scale"]).dtype == torch.float64
