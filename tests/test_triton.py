"""Triton-specific checks: the interpreter's bf16 workaround, a fuzzing find, and the tiled and
split-L launch paths. Accuracy across dtypes, strides and gradients, opcheck and torch.compile
are in test_ops.py, for every backend.

Without CUDA the kernels run under the Triton interpreter, which must be switched on before the
kernels are defined (the first call into the backend).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import glmix_kernels as gk  # noqa: E402
from _helpers import Case, check_against_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in gk.available_backends(DEVICE),
                                reason=f"no triton backend for {DEVICE}")


def _ops():
    from glmix_kernels.backends import triton as tb
    return tb


@pytest.mark.skipif(DEVICE != "cpu", reason="the upcast is an interpreter workaround")
@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_bf16_dots_upcast_only_when_interpreting(op):
    tb = _ops()
    assert tb.kernels.INTERPRET
    x = torch.zeros(1, 1, 1)
    assert tb._upcast(x.bfloat16()) and not tb._upcast(x.half()) and not tb._upcast(x)
    # The interpreter's own bf16 dot is wrong: without the upcast this is far from the reference.
    check_against_reference(Case(2, 40, 48, 24, "nchw", broadcast=True, dtype=torch.bfloat16), op, "triton")


def test_bf16_dispatch_delta_from_recomputed_probabilities():
    """Fuzzing found dscale -1.2e-2 against an exact 9.3e-7 here, when delta' was rowsum(Hg * out):
    the bf16 forward rounds D before the value product, so that sum no longer matched the
    sum_s D dD of the D the backward recomputes, and dA = D (dD - delta') stopped summing to zero.
    """
    check_against_reference(Case(B=1, L=1, C=1, S=2, dtype=torch.bfloat16, device=DEVICE, seed=2),
                            "dispatch", "triton")


@pytest.mark.parametrize("op", ["cluster", "dispatch"])
def test_tiled_channels_slot_blocks_and_split_l(op):
    """A shape that takes every tiling path: C over several C blocks, S over several slot blocks
    of the reduction kernels, L over several chunks (plus a partial last tile)."""
    tb = _ops()
    B, L, C, S = 1, 77, 100, 70
    block_s, n_sb, chunk_len, n_chunks = tb.split_plan(B, S, L, torch.device(DEVICE))
    assert n_sb > 1 and n_chunks > 1 and L % chunk_len != 0
    if tb.kernels.INTERPRET:  # on a GPU the autotuned BLOCK_C varies; 100 > every config's 64
        assert all(C > cfg.kwargs["BLOCK_C"] for cfg in tb.kernels._REDUCE_CONFIGS)
    check_against_reference(Case(B, L, C, S, "nchw", broadcast=True, device=DEVICE), op, "triton")
