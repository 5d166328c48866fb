"""The reference ops against a naive formula written out element by element."""

import math

import pytest
import torch

from _helpers import Case
from glmix_kernels import reference


def naive(x, init_slots, scale):
    """Slots and dispatched pixels with Python loops over (b, s, l): nothing shared with the reference."""
    B, L, C = x.shape
    S = init_slots.shape[1]
    s0 = init_slots.expand(B, S, C)

    def unit(v):
        return v / max(math.sqrt(sum(float(t) ** 2 for t in v)), 1e-12)

    slots = torch.zeros(B, S, C, dtype=torch.float64)
    weights = torch.zeros(B, S, L, dtype=torch.float64)
    for b in range(B):
        k = [unit(x[b, l]) for l in range(L)]
        q = [unit(s0[b, s]) for s in range(S)]
        a = [[float(scale) * float(q[s] @ k[l]) for l in range(L)] for s in range(S)]
        for s in range(S):  # softmax over pixels
            m = max(a[s])
            e = [math.exp(v - m) for v in a[s]]
            for l in range(L):
                slots[b, s] += e[l] / sum(e) * x[b, l]
        for l in range(L):  # softmax over slots
            m = max(a[s][l] for s in range(S))
            e = [math.exp(a[s][l] - m) for s in range(S)]
            for s in range(S):
                weights[b, s, l] = e[s] / sum(e)
    return slots, weights


@pytest.mark.parametrize(
    "B,L,C,S,layout,broadcast",
    [
        (2, 13, 6, 1, "contiguous", False),
        (1, 9, 5, 64, "nchw", True),  # more slots than pixels
        (2, 11, 7, 4, "sliced", True),
        (1, 1, 3, 3, "nchw", False),
    ],
)
def test_matches_naive_formula(B, L, C, S, layout, broadcast):
    case = Case(B, L, C, S, layout, broadcast, dtype=torch.float64)
    x, s0 = case.view_x(case.x_base), case.view_slots(case.slots0_base)
    slots, weights = naive(x, s0, case.scale)
    torch.testing.assert_close(reference.soft_cluster(x, s0, case.scale.double()), slots, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.slot_assignment(x, s0, case.scale.double()), weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        reference.soft_dispatch(x, s0, case.scale.double(), case.slots),
        weights.transpose(1, 2) @ case.slots,
        rtol=1e-12,
        atol=1e-12,
    )


def test_wide_channels_match_naive_formula():
    case = Case(1, 5, 1024, 2, "nchw", dtype=torch.float64)
    x, s0 = case.view_x(case.x_base), case.view_slots(case.slots0_base)
    slots, _ = naive(x, s0, case.scale)
    torch.testing.assert_close(reference.soft_cluster(x, s0, case.scale.double()), slots, rtol=1e-12, atol=1e-12)


def test_zero_vectors_follow_normalize_epsilon():
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    x[0, 2] = 0
    s0 = torch.randn(1, 3, 4, dtype=torch.float64)
    slots, _ = naive(x, s0, torch.tensor(5.0))
    torch.testing.assert_close(reference.soft_cluster(x, s0, torch.tensor(5.0)), slots, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_follows_x(dtype):
    case = Case(2, 10, 8, 4)
    x, s0 = case.x_base.to(dtype), case.slots0_base.to(dtype)
    assert reference.soft_cluster(x, s0, case.scale).dtype == dtype
    assert reference.soft_dispatch(x, s0, case.scale, case.slots.to(dtype)).dtype == dtype


def test_gradcheck_fp64():
    case = Case(2, 7, 5, 3, "nchw", broadcast=True)
    xb, s0b, scale, slots = case.leaves(torch.float64)

    def both(xb, s0b, scale, slots):
        x, s0 = case.view_x(xb), case.view_slots(s0b)
        return reference.soft_cluster(x, s0, scale), reference.soft_dispatch(x, s0, scale, slots)

    assert torch.autograd.gradcheck(both, (xb, s0b, scale, slots))
