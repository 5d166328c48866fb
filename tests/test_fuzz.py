"""Property-based fuzzing: random shapes, dtypes and layouts, every fused backend against the reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import TOL, Case, assert_close_normwise, backend_params, require

cases = st.builds(
    dict,
    B=st.integers(1, 3),
    L=st.integers(1, 70),
    C=st.integers(1, 72),
    S=st.integers(1, 40),
    layout=st.sampled_from(["contiguous", "nchw", "sliced"]),
    broadcast=st.booleans(),
    slots_layout=st.sampled_from(["contiguous", "transposed"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    op=st.sampled_from(["cluster", "dispatch"]),
)


@pytest.mark.parametrize("backend,device", backend_params(devices=["cpu"]))
def test_fuzz_against_reference(backend, device):
    require(backend, device)

    # Bounded for CI: a fixed number of examples, no per-example deadline (the interpreter is slow).
    @settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(cases)
    def check(c):
        op = c.pop("op")
        case = Case(device=device, **c)
        out, grads = case.run(op, backend, case.dtype)
        ref_out, ref_grads = case.expected(op)
        for got, want in zip([out] + grads, [ref_out] + ref_grads):
            assert_close_normwise(got, want, TOL[case.dtype], f"{op} {c}")

    check()
