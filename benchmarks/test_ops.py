"""Op level: cluster, dispatch and the pair; fwd, bwd and full; every op-level backend."""

from glmix_kernels.bench import workloads

from ._common import DEVICE, run_benchmark, skip_unless_timed


def test_op(benchmark, op_case):
    c = op_case
    C, L = workloads.STAGE_SHAPES[c.stage]
    S = workloads.NUM_SLOTS
    skip_unless_timed(c.backend, c.dtype, C, S)
    dtype = workloads.DTYPE_NAMES[c.dtype]
    w = workloads.op_workload(c.op, c.backend, c.mode, c.B, L, C, S, c.dtype, DEVICE)
    run_benchmark(
        benchmark,
        w,
        rounds=c.rounds,
        group=f"{c.op} {c.mode} {c.stage} B={c.B} {dtype}",
        op=c.op,
        backend=c.backend,
        mode=c.mode,
        dtype=dtype,
        shape=dict(B=c.B, L=L, C=C, S=S),
    )
