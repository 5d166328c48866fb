"""How every benchmark of this package times a call and measures its memory (one place for both
the pytest benchmarks and the quick job).

GPU: CUDA events around each call, after warm-up, median of the repetitions, inputs rotated over
several freshly drawn sets when one set fits in L2 (a set just written by ``randn`` would
otherwise sit in L2 and flatter a memory-bound kernel); sets a call consumes (a recorded forward
for a timed backward) are drawn afresh batch by batch, between timed calls. Memory:
``torch.cuda.max_memory_allocated`` over one call. CPU: ``time.perf_counter`` (the benchmarks use
pytest-benchmark's own timer instead); memory is the bytes saved for backward, counted once per
storage.
"""

import itertools
import math
import statistics
import time

import torch

# More sets than this buys nothing: by then they exceed any L2 several times over.
_MAX_SETS = 8


def device_name(device):
    """The GPU's name as torch reports it, or ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def versions():
    """Library, torch and Triton versions (Triton ``None`` when not importable)."""
    import glmix_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"glmix_kernels": glmix_kernels.__version__, "torch": torch.__version__, "triton": triton_version}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(fn):
    """Runs ``fn()``; returns ``(its result, bytes autograd saved for backward meanwhile)``.

    Each storage counts once, whole, however many saved tensors view it. The storages are held
    until the count is done, so a freed one's address cannot be reused and miscounted.
    """
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr(), s.device] = s
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(s.nbytes() for s in storages.values())


def peak_memory(run, make_inputs, device):
    """Memory of one call ``run(*make_inputs())``: on a GPU the peak allocated over a call after a
    warm-up call (its inputs, already resident, included); on the CPU the bytes saved for backward while the
    inputs are made and the call runs (a recorded forward among the inputs counts)."""
    device = torch.device(device)
    if device.type != "cuda":
        return saved_bytes(lambda: run(*make_inputs()))[1]
    run(*make_inputs())  # warm-up: compilation and Triton's autotuning allocate memory the call never needs
    args = make_inputs()  # fresh: a backward-only call consumes its recorded forward
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def tensor_bytes(obj):
    """Bytes of the tensors in a (nested) tuple or list."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    return 0


def input_sets(make_inputs, device):
    """Fresh input sets to rotate through: enough that together they overflow the GPU's L2 twice,
    so each call reads its inputs from memory; two on the CPU."""
    first = make_inputs()
    device = torch.device(device)
    if device.type != "cuda":
        return [first, make_inputs()]
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    count = min(_MAX_SETS, max(1, math.ceil(2 * l2 / max(tensor_bytes(first), 1))))
    return [first] + [make_inputs() for _ in range(count - 1)]


def feed(make_inputs, device, single_use=False):
    """An endless iterator of input sets for timed calls: ``input_sets`` in rotation; or, for
    sets that a call consumes (a recorded forward, which backward frees), each set once, batch
    after batch of ``input_sets``, made between timed calls."""
    if not single_use:
        yield from itertools.cycle(input_sets(make_inputs, device))
    while True:
        sets = input_sets(make_inputs, device)
        while sets:
            yield sets.pop(0)  # dropped once used


def repetitions(estimate_s, target_s, least, most):
    """How many calls of ``estimate_s`` seconds fill ``target_s``, within ``[least, most]``."""
    return max(least, min(most, int(target_s / max(estimate_s, 1e-9))))


def time_once(run, args, device):
    """Seconds of one call, host clock, device synchronised."""
    synchronize(device)
    start = time.perf_counter()
    run(*args)
    synchronize(device)
    return time.perf_counter() - start


def measure(run, inputs, device, *, target_s=0.2, min_reps=5, max_reps=500, warmup=3):
    """Median seconds of ``run(*next(inputs))`` (``inputs``: a ``feed``); repetitions fill
    about ``target_s``.

    Returns ``{"median_s", "q20_s", "q80_s", "reps"}``. On a GPU, CUDA events around each call
    time the device's work; a call whose launches take longer than its kernels still shows the
    wait, as it would in a real step.
    """
    device = torch.device(device)
    for _ in range(warmup):
        run(*next(inputs))
    reps = repetitions(time_once(run, next(inputs), device), target_s, min_reps, max_reps)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            args = next(inputs)  # made, when fresh, before the start event: not timed
            begin.record()
            run(*args)
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        times = [time_once(run, next(inputs), device) for _ in range(reps)]
    q = statistics.quantiles(times, n=5, method="inclusive")
    return {"median_s": statistics.median(times), "q20_s": q[0], "q80_s": q[-1], "reps": reps}


def is_out_of_memory(exc):
    """Whether ``exc`` is an allocation failure (CUDA, or the CPU allocator's)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )
