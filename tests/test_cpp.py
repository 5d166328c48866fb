"""The C++ extension itself: that it loads, its CMake build and C++ test, and the ops' own input
checks.

Accuracy, gradcheck, opcheck and torch.compile are tests/test_ops.py's job, for every backend;
this file covers what only the C++ build has.
"""

import os
import shutil
import subprocess

import pytest
import torch

import glmix_kernels
from glmix_kernels.backends import cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_extension = pytest.mark.skipif(
    "cpu" not in glmix_kernels.available_backends("cpu"), reason=f"{cpp.unavailable_reason('cpu')}"
)


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
        (
            "configure",
            ["cmake", "-S", ROOT, "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
            + (["-G", "Ninja"] if shutil.which("ninja") else []),
        ),
        ("build", ["cmake", "--build", str(tmp_path)]),
        ("ctest", ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"]),
    ]
    for step, cmd in steps:
        r = run(*cmd)
        assert r.returncode == 0, f"{step} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"


@needs_extension
@pytest.mark.parametrize(
    "init_shape,scale,message",
    [
        ((2, 3, 7), 1.0, "init_slots must be"),  # C of 7 against x's 8
        ((3, 3, 8), 1.0, "init_slots must be"),  # a batch of 3 against x's 2
        ((1, 3, 8), [1.0, 2.0], "scale must be a 0-d"),
    ],
)
def test_ops_reject_bad_query_inputs(init_shape, scale, message):
    """Called directly (not through soft_cluster's checks), the ops' prologue names the argument."""
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.glmix_kernels.cluster_fwd(x, torch.randn(init_shape), torch.tensor(scale))
