"""Mixer comparison (in the spirit of "Demystify Transformers & Convolutions"): one GLNet skeleton
whose GLMix stages run as GLMix on fused ops, GLMix on the reference ops, full attention, or the
local branch alone; a training step's time and memory against input resolution, out-of-memory
included, so GLMix's scaling is measured rather than quoted."""

from glmix_kernels.bench import workloads

from ._common import DEVICE, MODEL_DTYPE, run_model_benchmark, skip_unless_timed


def test_mixer(benchmark, mixer_case):
    c = mixer_case
    skip_unless_timed(c.backend)
    depth = {} if c.depth is None else {"depth": list(c.depth)}

    def make_workload():
        model = workloads.build_mixer_model(c.backend, **depth)
        return workloads.model_workload(model, "train", c.B, c.resolution, MODEL_DTYPE, DEVICE)

    run_model_benchmark(
        benchmark, c, make_workload, op=f"mixer:{c.name}", group=f"mixer {c.name} train {c.resolution}px B={c.B}"
    )
