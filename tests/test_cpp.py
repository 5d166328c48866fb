"""The C++ extension itself: its CMake build and C++ test, the registered ops (opcheck), and
float64 gradcheck through the public functions on the "cpu" backend.

Forward and gradient accuracy against the reference over dtypes and strides is tests/test_ops.py's
job, for every backend; this file covers what only the C++ build has.
"""
import os
import shutil
import subprocess

import pytest
import torch

import glmix_kernels
from glmix_kernels._autograd import scaled_queries
from glmix_kernels.backends import cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_extension = pytest.mark.skipif("cpu" not in glmix_kernels.available_backends("cpu"),
                                     reason=f"{cpp.unavailable_reason('cpu')}")


def test_extension_loads():
    """Every "cpu" test skips when the extension cannot load, so a built but broken extension (an
    unresolved symbol, say) must fail here instead. Only a pure-Python install may lack it."""
    if os.environ.get("GLMIX_SKIP_EXT") == "1":
        pytest.skip("GLMIX_SKIP_EXT is set: a pure-Python install")
    assert cpp.unavailable_reason("cpu") is None, cpp.unavailable_reason("cpu")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    """Configure and build CMakeLists.txt (library + C++ test), then run ctest."""
    import torch.utils

    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("MAX_JOBS", "2"))
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)  # noqa: E731
    steps = [
        ("configure", ["cmake", "-S", ROOT, "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
         + (["-G", "Ninja"] if shutil.which("ninja") else [])),
        ("build", ["cmake", "--build", str(tmp_path)]),
        ("ctest", ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"]),
    ]
    for step, cmd in steps:
        r = run(*cmd)
        assert r.returncode == 0, f"{step} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"


def _op_inputs(dtype, B=2, L=37, S=3, C=8):
    g = torch.Generator().manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(B, C, L, dtype=dtype, generator=g).transpose(1, 2)  # the NCHW view
    qs = scaled_queries(torch.randn(1, S, C, dtype=acc, generator=g), torch.tensor(3.0, dtype=acc), B)
    slots = torch.randn(B, S, C, dtype=dtype, generator=g)
    return x, qs, slots, g


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    """Schemas, fake (meta) implementations and dispatcher registration of the four ops."""
    ops = torch.ops.glmix_kernels
    x, qs, slots, g = _op_inputs(dtype)
    slots_c, lse_c = ops.cluster_fwd(x, qs)
    assert slots_c.dtype == qs.dtype  # the accumulation dtype, which cluster_bwd reads back
    out, lse_d = ops.dispatch_fwd(x, qs, slots)
    grad_c = torch.randn(slots_c.shape, dtype=dtype, generator=g)
    grad_d = torch.randn(out.shape, dtype=dtype, generator=g)
    for op, args in [
        (ops.cluster_fwd, (x, qs)),
        (ops.cluster_bwd, (grad_c, x, qs, slots_c, lse_c)),
        (ops.dispatch_fwd, (x, qs, slots)),
        (ops.dispatch_bwd, (grad_d, x, qs, slots, lse_d)),
    ]:
        torch.library.opcheck(op, args)


@needs_extension
def test_compile_fullgraph():
    """The ops trace into one graph through their fake implementations."""
    ops = torch.ops.glmix_kernels
    x, qs, slots, _ = _op_inputs(torch.float32)

    def f(x, qs, slots):
        pooled, _ = ops.cluster_fwd(x, qs)
        out, _ = ops.dispatch_fwd(x, qs, pooled + slots)
        return out

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, qs, slots), f(x, qs, slots))


def _gradcheck_inputs(B, L, S, C, broadcast, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, L, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
    init = torch.randn(1 if broadcast else B, S, C, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    slots = torch.randn(B, S, C, dtype=torch.float64, generator=g).requires_grad_()
    return x, init, scale, slots


@needs_extension
@pytest.mark.parametrize("B,L,S,C", [(2, 5, 3, 4), (1, 7, 1, 3), (3, 3, 5, 2)])
@pytest.mark.parametrize("broadcast", [False, True], ids=["per_batch", "broadcast"])
def test_gradcheck(B, L, S, C, broadcast):
    x, init, scale, slots = _gradcheck_inputs(B, L, S, C, broadcast, seed=B * 100 + L)
    cluster = lambda x, s, t: glmix_kernels.soft_cluster(x, s, t, backend="cpu")  # noqa: E731
    dispatch = lambda x, s, t, v: glmix_kernels.soft_dispatch(x, s, t, v, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(cluster, (x, init, scale))
    assert torch.autograd.gradcheck(dispatch, (x, init, scale, slots))
