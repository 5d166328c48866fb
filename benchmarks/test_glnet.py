"""Model level: glnet_4g and glnet_stl, inference and one training step, per backend."""
from glmix_kernels.bench import workloads
from glmix_kernels.models import create_model

from ._common import DEVICE, MODEL_DTYPE, run_model_benchmark, skip_unless_timed


def test_glnet(benchmark, glnet_case):
    c = glnet_case
    skip_unless_timed(c.backend)
    depth = {} if c.depth is None else {"depth": list(c.depth)}

    def make_workload():
        model = create_model(c.model, backend=c.backend, **depth)
        return workloads.model_workload(model, c.mode, c.B, c.resolution, MODEL_DTYPE, DEVICE)

    run_model_benchmark(benchmark, c, make_workload, op=c.name,
                        group=f"{c.name} {c.mode} {c.resolution}px B={c.B}")
