"""Model level: glnet_4g and glnet_stl, inference and one training step, per backend; glnet_4g's
multi-scale feature extraction at a detection image size."""

import torch

from glmix_kernels.bench import workloads
from glmix_kernels.models import create_model

from ._common import DEVICE, MODEL_DTYPE, run_benchmark, run_model_benchmark, skip_unless_timed


def test_glnet(benchmark, glnet_case):
    c = glnet_case
    skip_unless_timed(c.backend)
    depth = {} if c.depth is None else {"depth": list(c.depth)}

    def make_workload():
        model = create_model(c.model, backend=c.backend, **depth)
        return workloads.model_workload(model, c.mode, c.B, c.resolution, MODEL_DTYPE, DEVICE)

    run_model_benchmark(benchmark, c, make_workload, op=c.name, group=f"{c.name} {c.mode} {c.resolution}px B={c.B}")


def test_glnet_features(benchmark, feature_case):
    c = feature_case
    skip_unless_timed(c.backend)
    depth = {} if c.depth is None else {"depth": list(c.depth)}
    model = create_model(c.model, backend=c.backend, features_only=True, **depth).to(DEVICE).eval()

    def extract(images):
        with torch.inference_mode(), workloads.autocast(DEVICE, MODEL_DTYPE):
            return model(images)

    workload = workloads.Workload(lambda: (torch.randn(c.B, 3, c.H, c.W, device=DEVICE),), extract)
    run_benchmark(
        benchmark,
        workload,
        rounds=c.rounds,
        group=f"{c.name} {c.H}x{c.W} B={c.B}",
        op=c.name,
        backend=c.backend,
        mode=c.mode,
        dtype=workloads.DTYPE_NAMES[MODEL_DTYPE],
        shape=dict(B=c.B, H=c.H, W=c.W),
    )
