"""What the benchmark modules share: the sweeps (default and ``--full``, per device) and one way
to time a workload into pytest-benchmark with the fields the report reads."""

import gc
from dataclasses import dataclass

import pytest
import torch

from glmix_kernels.backends import BACKENDS
from glmix_kernels.bench import report, timing, workloads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Models train in mixed precision on a GPU, as GLNet is trained; the CPU runs float32.
MODEL_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# pytest-benchmark rounds: on the CPU they are the measurement, on a GPU a host-side cross-check
# of the CUDA-event timing.
OP_ROUNDS, MODEL_ROUNDS = 3, 2
FULL_OP_ROUNDS, FULL_MODEL_ROUNDS = 5, 3
# Seconds of CPU rounds worth spending per benchmark when calls are short.
CPU_TARGET_S = 0.5
# The default CPU run keeps every stage kind but one or two blocks of each, to stay in minutes.
REDUCED_DEPTH = (1, 1, 2, 1)


@dataclass(frozen=True)
class OpCase:
    op: str
    backend: str
    mode: str
    stage: str
    B: int
    dtype: torch.dtype
    rounds: int

    def __str__(self):
        return f"{self.op}-{self.mode}-{self.backend}-{self.stage}-B{self.B}-{workloads.DTYPE_NAMES[self.dtype]}"


@dataclass(frozen=True)
class ModelCase:
    model: str  # a GLNet variant; for the mixer comparison the skeleton (the variant is `backend`)
    mode: str
    backend: str
    resolution: int
    B: int
    depth: tuple  # None: the model's own
    rounds: int

    def __str__(self):
        depth = "" if self.depth is None else "-depth" + "".join(map(str, self.depth))
        return f"{self.model}-{self.mode}-{self.backend}-{self.resolution}px-B{self.B}{depth}"

    @property
    def name(self):
        """The model's name for the tables, its depth added when reduced."""
        return self.model if self.depth is None else f"{self.model}[depth {'-'.join(map(str, self.depth))}]"


@dataclass(frozen=True)
class FeatureCase:
    """Multi-scale feature extraction (``features_only``) at a detection pipeline's image size."""

    model: str
    backend: str
    B: int
    H: int
    W: int
    depth: tuple  # None: the model's own
    rounds: int
    mode: str = "infer"

    def __str__(self):
        depth = "" if self.depth is None else "-depth" + "".join(map(str, self.depth))
        return f"{self.model}-features-{self.backend}-{self.H}x{self.W}-B{self.B}{depth}"

    @property
    def name(self):
        return f"{self.model} features" + ("" if self.depth is None else f"[depth {'-'.join(map(str, self.depth))}]")


# COCO's usual test size: the short side 800, the long side 1216 here (a multiple of 32 near 1333).
FEATURE_SIZE = (800, 1216)


def feature_cases(full, device):
    if device.type == "cuda":
        batch, depth = 2, None
    else:
        batch, depth = 1, (None if full else REDUCED_DEPTH)
    rounds = FULL_MODEL_ROUNDS if full else MODEL_ROUNDS
    return [FeatureCase("glnet_4g", backend, batch, *FEATURE_SIZE, depth, rounds) for backend in BACKENDS]


def op_cases(full, device):
    if device.type == "cuda":
        stages, batches, dtypes = (
            list(workloads.STAGE_SHAPES),
            ((64, 128) if full else (128,)),
            (torch.bfloat16, torch.float16),
        )
    else:
        stages = list(workloads.STAGE_SHAPES) if full else ["glnet_4g.s1", "glnet_4g.s3", "glnet_4g.s4"]
        batches, dtypes = ((2, 8) if full else (2,)), (torch.float32,)
    rounds = FULL_OP_ROUNDS if full else OP_ROUNDS
    # Modes innermost: one compiled graph (per op and shape) serves the three in a row.
    cases = [
        OpCase(op, backend, mode, stage, B, dtype, rounds)
        for dtype in dtypes
        for stage in stages
        for B in batches
        for op in workloads.OPS
        for backend in workloads.OP_BACKENDS
        for mode in workloads.MODES
    ]
    if device.type == "cpu":  # one image at the smallest stage: where a call's fixed cost matters most
        cases += [
            OpCase("cluster+dispatch", backend, "full", "glnet_4g.s4", 1, torch.float32, rounds)
            for backend in workloads.OP_BACKENDS
        ]
    return cases


def glnet_cases(full, device):
    if device.type == "cuda":
        resolutions, depth = ((224, 512, 1024) if full else (224, 1024)), None
        batch = {224: 64, 512: 16, 1024: 4}
    else:
        resolutions, depth = ((224, 512) if full else (224,)), (None if full else REDUCED_DEPTH)
        batch = {r: 2 if full else 1 for r in resolutions}
    rounds = FULL_MODEL_ROUNDS if full else MODEL_ROUNDS
    return [
        ModelCase(model, mode, backend, res, batch[res], depth, rounds)
        for model in ("glnet_4g", "glnet_stl")
        for res in resolutions
        for mode in ("infer", "train")
        for backend in BACKENDS
    ]


def mixer_cases(full, device):
    if device.type == "cuda":
        # Up to where some variant runs out of memory, if one does; the batch stays fixed so time
        # and memory scale with resolution alone.
        resolutions = (224, 384, 512, 768, 1024, 1536, 2048) if full else (224, 512, 1024)
        batch, depth = 8, None
    else:
        resolutions = (224, 384, 512) if full else (224,)
        batch, depth = 1, (None if full else REDUCED_DEPTH)
    variants = [n for n in BACKENDS if n != "reference"] + [
        "reference",
        workloads.MIXER_ATTENTION,
        workloads.MIXER_LOCAL,
    ]
    rounds = FULL_MODEL_ROUNDS if full else MODEL_ROUNDS
    return [
        ModelCase(workloads.MIXER_SKELETON, "train", variant, res, batch, depth, rounds)
        for res in resolutions
        for variant in variants
    ]


CASES = {"op_case": op_cases, "glnet_case": glnet_cases, "mixer_case": mixer_cases, "feature_case": feature_cases}


def skip_unless_timed(backend, dtype=torch.float32, channels=1, slots=1):
    """Skips the test, with the reason, when ``backend`` cannot be timed here."""
    if backend in BACKENDS or backend in workloads.BASELINES:
        why = workloads.skip_reason(backend, DEVICE, dtype, channels, slots)
        if why is not None:
            pytest.skip(f"backend {backend!r}: {why}")


def run_benchmark(benchmark, workload, *, rounds, group, **fields):
    """Times ``workload`` and files ``fields`` (``report.record``'s) in ``benchmark.extra_info``.

    The memory measurement warms up first (compilation and autotuning happen there). On the CPU
    pytest-benchmark's rounds are the timing: at least ``rounds``, more for calls short enough
    that a few rounds would be mostly scheduling noise. On a GPU the time is the CUDA-event
    median (``timing.measure``) and ``rounds`` synchronised calls only fill pytest-benchmark's
    own table.
    """
    benchmark.group = group
    memory = timing.peak_memory(workload.run, workload.make_inputs, DEVICE)
    inputs = workload.feed(DEVICE)
    if ON_GPU:
        t = timing.measure(workload.run, inputs, DEVICE)
        extra = dict(
            time_s=t["median_s"], time_q20_s=t["q20_s"], time_q80_s=t["q80_s"], reps=t["reps"], timer="cuda-events"
        )

        def call(*args):
            workload.run(*args)
            torch.cuda.synchronize(DEVICE)
    else:
        extra = dict(timer="pytest-benchmark")
        call = workload.run
        # Two more warm-up calls; the faster sizes the rounds (one that lost its core to another
        # process would size them too few).
        estimate = min(timing.time_once(call, next(inputs), DEVICE) for _ in range(2))
        rounds = timing.repetitions(estimate, CPU_TARGET_S, rounds, 50)
    benchmark.pedantic(call, setup=lambda: (next(inputs), {}), rounds=rounds)
    benchmark.extra_info.update(report.record(device=DEVICE, peak_mem_bytes=memory, **fields, **extra))


# (op, backend, mode, dtype) -> the smallest resolution at which it ran out of memory
_OUT_OF_MEMORY = {}


def run_model_benchmark(benchmark, case, make_workload, *, op, group):
    """``run_benchmark`` for a model step at ``case.resolution``; running out of memory is a
    result: recorded (``oom`` in extra_info, no time) and larger resolutions are then skipped."""
    dtype = workloads.DTYPE_NAMES[MODEL_DTYPE]
    key = (op, case.backend, case.mode, dtype, case.B)
    if _OUT_OF_MEMORY.get(key, case.resolution + 1) < case.resolution:
        pytest.skip(f"out of memory already at {_OUT_OF_MEMORY[key]} pixels")
    fields = dict(
        op=op,
        backend=case.backend,
        mode=case.mode,
        dtype=dtype,
        shape=dict(B=case.B, H=case.resolution, W=case.resolution),
    )
    try:
        run_benchmark(benchmark, make_workload(), rounds=case.rounds, group=group, **fields)
        return
    except Exception as e:
        if not timing.is_out_of_memory(e):
            raise
        error = str(e).splitlines()[0]
    # Out of the except block, the traceback's frames (and the tensors they hold) are gone.
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
    _OUT_OF_MEMORY[key] = case.resolution
    benchmark.extra_info.update(report.record(device=DEVICE, peak_mem_bytes=None, oom=True, error=error, **fields))
    if benchmark.stats is None:
        # pytest-benchmark saves only benchmarks that timed something; this no-op's time is not a
        # result (the record has no time_s and says oom, so the report shows OOM).
        benchmark.pedantic(lambda: None)
