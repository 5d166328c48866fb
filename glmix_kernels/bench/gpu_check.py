"""The GPU check behind ``scripts/gpu_check.sh``: install, test, sanitise and measure on a fresh
GPU machine in one command, within a time limit, everything written to one folder.

    python -m glmix_kernels.bench.gpu_check run OUT_DIR [--dry-run] [--time-limit S] [--steps a,b] [--full-tests]
    python -m glmix_kernels.bench.gpu_check step NAME WORK_DIR --deadline T [--dry-run] [--full-tests]
    python -m glmix_kernels.bench.gpu_check kernels --device D --backends a,b [--tiny]

``run`` runs each step (``STEPS``) in its own process, with its own deadline, so a crash, a hung
kernel or a step over its time leaves the others standing. A step's deadline is the total limit
less the budgets of the steps after it: a step may use what earlier steps left, never what later
ones need. After every step ``OUT_DIR`` gets ``summary.json`` (each step's status), ``report.md``,
``bench.json`` and ``logs.tar.gz`` afresh, so a machine that goes away mid-run still leaves the
steps done so far.

``--dry-run`` runs the same steps on CPU tensors at tiny sizes (Triton under its interpreter), so
the script is known to work before it first meets a GPU.
"""

import argparse
import contextlib
import datetime
import glob
import io
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from xml.etree import ElementTree

MODULE = "glmix_kernels.bench.gpu_check"  # what each step process runs
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_FILES = ("summary.json", "report.md", "bench.json", "logs.tar.gz")
# Each log goes into the archive cut to its first and last bytes beyond this (a sanitizer that
# finds thousands of errors must not push the archive past what comes back from the machine).
LOG_CAP_BYTES = 2 << 20
# Seconds kept back from the steps for the report and the archive.
REPORT_RESERVE_S = 10

# What the GPU run covers.
GPU_TEST_BACKENDS = ("triton", "cuda")
GPU_BENCH_BACKENDS = ("triton", "cuda", "reference", "compile", "sdpa")
SANITIZER_BACKENDS = ("cuda",)
SANITIZER_TOOLS = ("memcheck", "racecheck")
BENCH_OP = "cluster+dispatch"
BENCH_MODES = ("fwd", "full")
BENCH_STAGES = ("glnet_4g.s1", "glnet_4g.s3")
TRAIN_MODEL = "glnet_4g"
# What the dry run times: enough to run the timing code; emulated or interpreted kernels would
# take minutes at its sizes.
DRY_RUN_TIMED = ("reference", "sdpa", "cpu")


@dataclass(frozen=True)
class Step:
    name: str
    gpu_budget_s: int
    dry_budget_s: int
    what: str

    def budget(self, settings):
        seconds = self.dry_budget_s if settings.dry_run else self.gpu_budget_s
        # The whole suite: about three times the CUDA-tensor tests.
        return 3 * seconds if self.name == "tests" and settings.full_tests else seconds


# In the order they run. GPU budgets sum to 460 s: with the report's reserve, under 8 minutes.
# The dry run's (200 s) are several times what it takes on two idle cores: shared CI cores are slow.
STEPS = (
    Step("install", 100, 55, "pip install -e . with the CUDA extension (parallel build, the local GPU's arch only)"),
    Step("env", 15, 15, "versions, GPU, clocks, driver, tools"),
    Step("tests", 130, 45, "the test suite on CUDA tensors for triton and cuda, all dtypes"),
    Step("sanitizer", 75, 40, "compute-sanitizer memcheck and racecheck over one small call of each CUDA kernel"),
    Step("bench", 90, 20, "cluster+dispatch at glnet_4g stages 1 and 3, fwd and full, and the card's copy bandwidth"),
    Step("train", 50, 25, "one glnet_4g training step per backend: images/s and peak memory"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def default_time_limit(steps, settings):
    return sum(s.budget(settings) for s in steps) + REPORT_RESERVE_S


def step_deadlines(steps, start, limit, settings):
    """Each step's deadline (seconds since the epoch): the end of the run, less the report's
    reserve, less the budgets of the steps after it. Budgets are scaled down together when they
    do not fit in ``limit``."""
    budgets = [s.budget(settings) for s in steps]
    scale = min(1.0, max(limit - REPORT_RESERVE_S, 0) / max(sum(budgets), 1))
    end = start + limit - REPORT_RESERVE_S
    return [end - scale * sum(budgets[i + 1 :]) for i in range(len(steps))]


# ------------------------------------------------------------------ settings per mode


@dataclass(frozen=True)
class Settings:
    """What the steps run: the GPU run's sizes, or the dry run's tiny ones on CPU tensors."""

    dry_run: bool
    full_tests: bool = False

    @property
    def device(self):
        return "cpu" if self.dry_run else "cuda"

    @property
    def batch(self):
        return 1 if self.dry_run else 128

    @property
    def dtype(self):
        # bf16 as GLNet trains on a GPU; the CPU runs float32 (as the quick job does there).
        import torch

        return torch.float32 if self.dry_run else torch.bfloat16

    @property
    def target_s(self):
        """Seconds of repetitions per timing: the dry run only shows that timing works."""
        return 0.01 if self.dry_run else 0.2

    @property
    def resolution(self):
        return 64 if self.dry_run else 224

    @property
    def model_kwargs(self):
        """glnet_4g as it is, or for the dry run every stage kind at one block."""
        return dict(depth=[1, 1, 1, 1]) if self.dry_run else {}

    @property
    def model_name(self):
        return f"{TRAIN_MODEL}[depth 1-1-1-1]" if self.dry_run else TRAIN_MODEL

    def stage_shape(self, stage):
        """(C, L) of ``stage``; the dry run keeps C and takes a 16th of the pixels."""
        from . import workloads

        C, L = workloads.STAGE_SHAPES[stage]
        return (C, max(L // 16, 7)) if self.dry_run else (C, L)


def step_env(dry_run):
    """The environment of every step process: the dry run hides any GPU, runs Triton under its
    interpreter, and keeps to one thread (tiny shapes gain nothing from threads, and on busy
    shared cores each OpenMP barrier can wait out another process's time slice); the GPU run
    makes sure Triton compiles."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def fused_backends(device):
    """Registry backends with kernels (not the reference) that can run on ``device`` here."""
    import glmix_kernels

    return [b for b in glmix_kernels.available_backends(device) if b != "reference"]


# ------------------------------------------------------------------ small helpers


def _run(cmd, *, timeout=None, env=None, capture=False, first_signal=signal.SIGTERM):
    """Runs ``cmd`` from the repository root in its own process group; returns ``(rc, output)``.
    Output goes to this process's stdout (the step's log) unless captured. rc is None when it was
    stopped at ``timeout`` (``first_signal``, then harder ones); 127 when the program is missing."""
    print(f"$ {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            start_new_session=True,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError as e:
        print(e, flush=True)
        return 127, str(e)
    _CHILDREN.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        print(f"stopping it after {timeout:.0f} s", flush=True)
        _kill_group(proc, first_signal)
        return None, ""
    finally:
        _CHILDREN.discard(proc)


# The programs a step process is running: each in its own process group, out of reach of a
# signal to the step's group, so the step ends them itself when it is stopped.
_CHILDREN = set()


def _stop_children(signum, frame):
    for proc in list(_CHILDREN):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def _kill_group(proc, first_signal=signal.SIGTERM):
    """Ends ``proc`` and every process it started (its own process group): ``first_signal``, then
    SIGTERM, then SIGKILL, each after the last had a few seconds."""
    for sig, wait_s in ((first_signal, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tool(name):
    """Path of a CUDA tool: on the PATH, else in CUDA_HOME's or the default toolkit's bin."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        path = os.path.join(home or "", "bin", name)
        if home and os.access(path, os.X_OK):
            return path
    return None


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ step: install


def _cuda_capability():
    import torch

    return "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def _extra_cuda_include():
    """The CUDA wheels' headers, when the local toolkit lacks the cuBLAS ones torch includes."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "include", "cublas_v2.h")):
        return None
    import sysconfig

    found = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include", "cublas_v2.h"))
    return os.path.dirname(max(found)) if found else None


def install(settings, deadline):
    """``pip install --no-build-isolation -e .``: no download, no dependencies (torch and the
    tools are the machine's), ``MAX_JOBS`` = the cores, only the local GPU's architecture. The dry
    run asks pip the same with ``--dry-run`` (nothing built or installed). Then a fresh process
    must see the compiled backends."""
    env = step_env(settings.dry_run)
    env["MAX_JOBS"] = str(os.cpu_count() or 1)
    result = {"MAX_JOBS": env["MAX_JOBS"]}
    arch = None if settings.dry_run else _cuda_capability()
    if arch:
        env["GLMIX_CUDA_ARCH"] = result["GLMIX_CUDA_ARCH"] = arch
    include = None if settings.dry_run else _extra_cuda_include()
    if include:
        env["GLMIX_EXTRA_INCLUDE"] = result["GLMIX_EXTRA_INCLUDE"] = include
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    if settings.dry_run:
        cmd.insert(4, "--dry-run")
    started = time.time()
    rc, _ = _run(cmd, timeout=deadline - time.time(), env=env)
    result.update(pip_rc=rc, pip_s=round(time.time() - started, 1))
    failures = [] if rc == 0 else [f"pip install exited with {rc}" if rc is not None else "pip install timed out"]

    probe = f"import json, glmix_kernels as g; print(json.dumps(g.available_backends({settings.device!r})))"
    rc, out = _run([sys.executable, "-c", probe], timeout=max(deadline - time.time(), 1), env=env, capture=True)
    print(out)
    backends = json.loads(out.strip().splitlines()[-1]) if rc == 0 else []
    result["backends"] = backends
    needed = ("cpu",) if settings.dry_run else GPU_TEST_BACKENDS
    missing = [b for b in needed if b not in backends]
    if missing:
        failures.append(f"backends {missing} unavailable on {settings.device} after the install")
    result["failures"] = failures
    return result


# ------------------------------------------------------------------ step: env

# nvidia-smi fields, one query each so that a field an older driver lacks costs only itself.
SMI_FIELDS = (
    "name",
    "driver_version",
    "pci.bus_id",
    "memory.total",
    "pstate",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "clocks.applications.graphics",
    "power.draw",
    "power.limit",
    "temperature.gpu",
    "persistence_mode",
    "compute_mode",
)


def gpu_state():
    """nvidia-smi's view of the first GPU, field by field, or why there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"nvidia-smi": "not found"}
    state = {}
    for field in SMI_FIELDS:
        rc, out = _run([smi, f"--query-gpu={field}", "--format=csv,noheader"], timeout=20, capture=True)
        state[field] = out.strip().splitlines()[0] if rc == 0 and out.strip() else f"? ({rc})"
    return state


def _version_line(tool, *args):
    path = _tool(tool)
    if not path:
        return "not found"
    rc, out = _run([path, *args], timeout=30, capture=True)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return f"{path}: {lines[-1] if lines else '?'}" if rc == 0 else f"{path}: exited with {rc}"


def environment(settings, deadline):
    """Versions, the GPU (name, capability, memory, clocks, driver), the tools, the commit."""
    import torch

    from glmix_kernels.backends import BACKENDS, why_unavailable

    from . import timing

    rc, commit = _run(["git", "rev-parse", "HEAD"], timeout=10, capture=True)
    _, dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], timeout=10, capture=True)
    result = {
        "date": _now(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": timing.versions(),
        "torch_cuda": torch.version.cuda,
        "commit": commit.strip() if rc == 0 else None,
        "dirty": bool(dirty.strip()),
        "nvcc": _version_line("nvcc", "--version"),
        "compute-sanitizer": _version_line("compute-sanitizer", "--version"),
        "backends": {n: why_unavailable(n, settings.device) or "available" for n in BACKENDS},
        "gpu": gpu_state(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        result["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_bytes": p.total_memory,
            "multiprocessors": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None),
        }
    else:
        result["device"] = {"name": "cpu", "threads": torch.get_num_threads()}
    if shutil.which("nvidia-smi"):
        _run(["nvidia-smi", "-q"], timeout=30)  # the whole record, into the log
    print(json.dumps(result, indent=1, default=str))
    result["failures"] = []
    return result


# ------------------------------------------------------------------ step: tests


def test_selection(settings):
    """``(paths, -k expression, backends)`` of the tests to run. GPU: every test of a fused
    backend on CUDA tensors (their ids hold ``<backend>-cuda``) and the Triton file; ``--full-tests``:
    the whole suite. Dry run: the reference comparison of the fused CPU backends at one shape."""
    if settings.dry_run:
        backends = fused_backends("cpu")
        pairs = " or ".join(f"{b}-cpu" for b in backends)
        return ["tests/test_ops.py"], f"({pairs}) and test_matches_reference and float32 and B2-L37", backends
    if settings.full_tests:
        return ["tests"], None, list(GPU_TEST_BACKENDS)
    pairs = " or ".join(f"{b}-cuda" for b in GPU_TEST_BACKENDS)
    return ["tests"], f"{pairs} or test_triton.py", list(GPU_TEST_BACKENDS)


def junit_counts(path, backends, device):
    """Counts of a JUnit XML file, the failed tests' names, the skip reasons, and per backend the
    tests that passed on ``device`` (their names hold ``<backend>-<device>``)."""
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skip_reasons, passed_per_backend = [], {}, {b: 0 for b in backends}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
            for b in backends:
                passed_per_backend[b] += f"{b}-{device}" in name
    return dict(
        counts=counts, failed_tests=failed[:50], skip_reasons=skip_reasons, passed_per_backend=passed_per_backend
    )


def tests(settings, deadline, logs):
    paths, keyword, backends = test_selection(settings)
    junit = os.path.join(logs, "tests.xml")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *paths,
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={junit}",
    ]
    if keyword:
        cmd += ["-k", keyword]
    if not settings.dry_run and _importable("xdist"):
        # Triton compiles on the host: the cores compile in parallel what one process would in turn.
        cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    # Past its time pytest gets SIGINT, as from Ctrl-C: it stops and still writes the JUnit XML of
    # the tests it ran, in the seconds kept back here.
    rc, _ = _run(cmd, timeout=deadline - time.time() - 15, env=step_env(settings.dry_run), first_signal=signal.SIGINT)
    result = {"command": cmd, "rc": rc, "backends": backends}
    failures = [] if rc == 0 else ["pytest timed out" if rc is None else f"pytest exited with {rc}"]
    if os.path.exists(junit):
        result.update(junit_counts(junit, backends, settings.device))
        failures += [
            f"no test of backend {b!r} passed on {settings.device} tensors"
            for b, n in result["passed_per_backend"].items()
            if n == 0
        ]
    else:
        failures.append("pytest wrote no JUnit XML")
    result["failures"] = failures
    return result


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------ step: sanitizer

# (B, L, C, S, broadcast init_slots): one pixel tile, several chunks (split-L), wide channels.
KERNEL_SHAPES = ((2, 37, 32, 5, True), (2, 300, 64, 64, False), (1, 131, 384, 24, True))


def kernel_calls(device, backends, tiny=False):
    """One small forward and backward of each op per backend, dtype and shape (every kernel of
    a backend runs); checks the results are finite. ``tiny``: one shape in float32 (the dry run,
    where Triton is interpreted). Returns the failures as strings."""
    import torch

    import glmix_kernels

    torch.manual_seed(0)
    failures = []
    shapes = KERNEL_SHAPES[:1] if tiny else KERNEL_SHAPES
    dtypes = (torch.float32,) if tiny else (torch.float32, torch.float16, torch.bfloat16)
    for backend, dtype, (B, L, C, S, broadcast) in itertools.product(backends, dtypes, shapes):
        x = torch.randn(B, C, L, device=device, dtype=dtype).transpose(1, 2).requires_grad_()  # NCHW view
        init_slots = torch.randn(1 if broadcast else B, S, C, device=device, dtype=dtype, requires_grad=True)
        scale = torch.tensor(5.0, device=device, requires_grad=True)
        slots = torch.randn(B, S, C, device=device, dtype=dtype, requires_grad=True)
        for op in ("cluster", "dispatch"):
            what = f"{backend} {op} {str(dtype)[6:]} B={B} L={L} C={C} S={S}"
            try:
                if op == "cluster":
                    out = glmix_kernels.soft_cluster(x, init_slots, scale, backend=backend)
                    leaves = (x, init_slots, scale)
                else:
                    out = glmix_kernels.soft_dispatch(x, init_slots, scale, slots, backend=backend)
                    leaves = (x, init_slots, scale, slots)
                grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
                ok = all(bool(torch.isfinite(t).all()) for t in (out,) + grads)
            except Exception as e:  # noqa: BLE001 - recorded, and the next call still runs
                ok = False
                print(f"{what}: {type(e).__name__}: {e}")
            print(f"{what}: {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failures.append(what)
    return failures


# compute-sanitizer's closing lines: memcheck's "ERROR SUMMARY: 2 errors", racecheck's
# "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)".
_ERRORS = re.compile(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error")


def sanitizer_errors(output):
    """Errors compute-sanitizer reported in ``output``, or None when it printed no summary."""
    found = [int(a or b) for a, b in _ERRORS.findall(output)]
    return sum(found) if found else None


def sanitizer(settings, deadline):
    """compute-sanitizer memcheck and racecheck over ``kernel_calls`` of the CUDA backend. Without
    the tool (or in the dry run) the calls run plainly, and the step says the tool did not run."""
    env = step_env(settings.dry_run)
    tool = _tool("compute-sanitizer")
    backends = fused_backends("cpu") if settings.dry_run else list(SANITIZER_BACKENDS)
    calls = [sys.executable, "-m", MODULE, "kernels", "--device", settings.device, "--backends", ",".join(backends)]
    if settings.dry_run:
        calls.append("--tiny")
    result = {"backends": backends, "tool": tool}
    if settings.dry_run or not tool:
        rc, _ = _run(calls, timeout=deadline - time.time(), env=env)
        result.update(
            status="skipped",
            calls_rc=rc,
            reason=(
                "dry run: compute-sanitizer needs a GPU"
                if settings.dry_run
                else "compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)"
            )
            + f"; the kernel calls ran without it: {'ok' if rc == 0 else 'FAILED'}",
        )
        result["failures"] = [] if rc == 0 else [f"kernel calls exited with {rc}"]
        return result
    # One cudaMalloc per tensor: inside the caching allocator's blocks an overrun is invisible.
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    failures = []
    for i, name in enumerate(SANITIZER_TOOLS):
        share = (deadline - time.time()) / (len(SANITIZER_TOOLS) - i)
        cmd = [tool, "--tool", name, "--error-exitcode", "3", "--print-limit", "100"]
        if name == "memcheck":
            cmd += ["--report-api-errors", "no"]  # torch's own probing API errors are not ours
        rc, out = _run(cmd + calls, timeout=share, env=env, capture=True)
        print(out)
        errors = sanitizer_errors(out)
        result[name] = {"rc": rc, "errors": errors}
        if rc is None:
            failures.append(f"{name} timed out after {share:.0f} s")
        elif rc != 0 or errors is None or errors > 0:
            failures.append(f"{name}: exit {rc}, errors {errors}")
    result["failures"] = failures
    return result


# ------------------------------------------------------------------ step: bench

# The HBM floor: the fewest bytes an op can move, each tensor it reads and each it writes once
# (the scale and the O(B*(S+L)) statistics left out), over the copy bandwidth measured in the
# same run. With P = B*L*C (a pixel tensor), Q = B*S*C (a slot tensor), I = init_slots' elements
# (B*S*C in these workloads) and e bytes per element, one cluster+dispatch call moves
#   fwd:  (3P + 2Q + 2I) e   clustering reads x, init_slots, writes slots (P + Q + I);
#                            dispatch reads x, init_slots, slots, writes out (2P + Q + I)
#   full: (8P + 6Q + 6I) e   fwd, plus dispatch backward: reads its grad, x, init_slots, slots,
#                            writes dx, d_init_slots, dslots (3P + 2Q + 2I); clustering backward:
#                            reads its grad, x, init_slots, slots, writes dx, d_init_slots (2P + 2Q + 2I)
FLOOR_PASSES = {"fwd": (3, 2, 2), "full": (8, 6, 6)}


def floor_bytes(mode, B, L, C, S, element_bytes):
    p, q, i = FLOOR_PASSES[mode]
    return (p * B * L * C + q * B * S * C + i * B * S * C) * element_bytes


def copy_bandwidth(device, nbytes):
    """Bytes per second of a device-to-device copy of ``nbytes`` (read and written: 2 * nbytes
    moved), the median of repeated copies."""
    import torch

    from . import timing

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timing.measure(lambda: dst.copy_(src), itertools.repeat(()), device, target_s=0.2)
    return 2 * src.nbytes / t["median_s"]


def bench(settings, deadline, results_path):
    """cluster+dispatch, fwd and full, at glnet_4g stages 1 and 3 for every op-level backend,
    each checked against the float32 reference (``quick.compare_ops``) and timed with
    ``timing.measure``; the copy bandwidth before and after. Results are saved after each backend."""
    from . import quick, workloads

    device, dtype = settings.device, settings.dtype
    result = {"records": [], "skipped": [], "failures": []}
    copy_bytes = (64 << 20) if settings.dry_run else (1 << 30)
    result["copy_bandwidth"] = {"bytes": copy_bytes, "before_Bps": copy_bandwidth(device, copy_bytes)}
    backends = workloads.OP_BACKENDS if settings.dry_run else GPU_BENCH_BACKENDS
    for stage, backend in itertools.product(BENCH_STAGES, backends):
        C, L = settings.stage_shape(stage)
        why = workloads.skip_reason(backend, device, dtype, C, workloads.NUM_SLOTS) or _dry_run_skip(settings, backend)
        if why is None and time.time() > deadline - 5:
            why = "no time left in this step"
        if why is not None:
            result["skipped"].append({"stage": stage, "backend": backend, "reason": why})
            if not settings.dry_run and backend in GPU_BENCH_BACKENDS:
                result["failures"].append(f"{stage} {backend}: not run ({why})")
            continue
        try:
            records, failures = quick.compare_ops(
                device,
                B=settings.batch,
                L=L,
                C=C,
                S=workloads.NUM_SLOTS,
                dtype=dtype,
                backends=[backend],
                op=BENCH_OP,
                modes=BENCH_MODES,
                target_s=settings.target_s,
            )
        except Exception as e:  # noqa: BLE001 - one backend's failure leaves the others to run
            traceback.print_exc()
            records, failures = [], [f"{stage} {backend}: {type(e).__name__}: {str(e).splitlines()[0]}"]
        for r in records:
            r["stage"] = stage
        result["records"] += records
        result["failures"] += failures
        add_floors(result)
        _write_json(results_path, result)  # partial results survive a kill at the deadline
    result["copy_bandwidth"]["after_Bps"] = copy_bandwidth(device, copy_bytes)
    if not settings.dry_run:
        result["gpu_after"] = gpu_state()  # the clocks under load
    add_floors(result)
    return result


def _dry_run_skip(settings, backend):
    if not settings.dry_run or backend in DRY_RUN_TIMED:
        return None
    if backend == "compile":
        return "dry run: inductor's C++ compile on the CPU takes minutes"
    return f"dry run: only {', '.join(DRY_RUN_TIMED)} are timed"


def add_floors(result):
    """Adds each record's floor bytes, floor time and fraction of the floor (floor time over its
    time) against the better of the two copy bandwidths."""
    bandwidth = max(result["copy_bandwidth"]["before_Bps"], result["copy_bandwidth"].get("after_Bps", 0))
    result["copy_bandwidth"]["used_Bps"] = bandwidth
    element = {"bfloat16": 2, "float16": 2, "float32": 4}
    for r in result["records"]:
        s = r["shape"]
        r["floor_bytes"] = floor_bytes(r["mode"], s["B"], s["L"], s["C"], s["S"], element[r["dtype"]])
        r["floor_s"] = r["floor_bytes"] / bandwidth
        r["floor_fraction"] = r["floor_s"] / r["time_s"] if r.get("time_s") else None


# ------------------------------------------------------------------ step: train


def train(settings, deadline, results_path):
    """One glnet_4g training step (forward, cross-entropy, backward, AdamW; bf16 autocast on the
    GPU) per registry backend: the median step time, images per second and the peak memory."""
    import gc

    import torch

    from glmix_kernels.backends import BACKENDS
    from glmix_kernels.models import create_model

    from . import report, timing, workloads

    device, dtype = settings.device, settings.dtype
    B, res, name = settings.batch, settings.resolution, settings.model_name
    result = {"records": [], "skipped": [], "failures": []}
    for backend in BACKENDS:
        why = workloads.skip_reason(backend, device) or _dry_run_skip(settings, backend)
        if why is None and time.time() > deadline - 5:
            why = "no time left in this step"
        if why is not None:
            result["skipped"].append({"backend": backend, "reason": why})
            if not settings.dry_run and backend in ("reference",) + GPU_TEST_BACKENDS:
                result["failures"].append(f"{name} {backend}: not run ({why})")
            continue
        fields = dict(
            op=name,
            backend=backend,
            mode="train",
            dtype=workloads.DTYPE_NAMES[dtype],
            device=device,
            shape=dict(B=B, H=res, W=res),
        )
        try:
            torch.manual_seed(0)
            model = create_model(TRAIN_MODEL, backend=backend, **settings.model_kwargs)
            w = workloads.model_workload(model, "train", B, res, dtype, device)
            memory = timing.peak_memory(w.run, w.make_inputs, device)
            t = timing.measure(
                w.run,
                w.feed(device),
                device,
                target_s=5 * settings.target_s,
                min_reps=2,
                max_reps=20,
                warmup=0 if settings.dry_run else 1,
            )
            record = report.record(peak_mem_bytes=memory, time_s=t["median_s"], reps=t["reps"], **fields)
            record["images_per_s"] = B / t["median_s"]
            print(
                f"{name} train {backend}: {t['median_s'] * 1e3:.1f} ms, {record['images_per_s']:.1f} images/s, "
                f"peak memory {memory / 1e6:.1f} MB",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - recorded; the next backend still runs
            traceback.print_exc()
            oom = timing.is_out_of_memory(e)
            record = report.record(peak_mem_bytes=None, time_s=None, oom=oom, error=str(e).splitlines()[0], **fields)
            if not oom:
                result["failures"].append(f"{name} {backend}: {type(e).__name__}: {str(e).splitlines()[0]}")
        model = w = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        result["records"].append(record)
        _write_json(results_path, result)
    return result


# ------------------------------------------------------------------ one step, in its own process


def run_step(name, work, settings, deadline):
    """Runs step ``name``; its result goes to ``work/results/<name>.json``. Exit status 1 when
    the step found failures or raised."""
    logs, results = os.path.join(work, "logs"), os.path.join(work, "results")
    path = os.path.join(results, f"{name}.json")
    try:
        if name == "install":
            result = install(settings, deadline)
        elif name == "env":
            result = environment(settings, deadline)
        elif name == "tests":
            result = tests(settings, deadline, logs)
        elif name == "sanitizer":
            result = sanitizer(settings, deadline)
        elif name == "bench":
            result = bench(settings, deadline, path)
        elif name == "train":
            result = train(settings, deadline, path)
        else:
            raise ValueError(f"unknown step {name!r}; steps: {STEP_NAMES}")
    except Exception as e:  # noqa: BLE001 - the step fails, with the traceback in its log
        traceback.print_exc()
        result = dict(_read_json(path) or {}, failures=[f"{type(e).__name__}: {e}"])
    _write_json(path, result)
    for f in result.get("failures", []):
        print(f"FAILED: {f}")
    return 1 if result.get("failures") else 0


# ------------------------------------------------------------------ the driver


class Run:
    """One check: its steps, their statuses, and the files in ``out``."""

    def __init__(self, out, settings, steps, time_limit):
        self.out, self.settings, self.steps, self.limit = out, settings, steps, time_limit
        self.work = tempfile.mkdtemp(prefix="glmix-gpu-check-")
        for sub in ("logs", "results"):
            os.makedirs(os.path.join(self.work, sub))
        self.start = time.time()
        self.summary = {
            "dry_run": settings.dry_run,
            "device": settings.device,
            "full_tests": settings.full_tests,
            "started": _now(),
            "finished": None,
            "time_limit_s": time_limit,
            "wall_s": None,
            "status": "running",
            "work_dir": self.work,
            "files": list(OUT_FILES),
            "steps": {s.name: {"status": "pending", "what": s.what} for s in steps},
        }
        self.current = None

    def execute(self):
        deadlines = step_deadlines(self.steps, self.start, self.limit, self.settings)
        for step, deadline in zip(self.steps, deadlines):
            self.run_one(step, deadline)
            self.write()
        return self.finish()

    def run_one(self, step, deadline):
        entry = self.summary["steps"][step.name]
        if deadline - time.time() < 1:
            entry.update(status="skipped", reason="no time left before the total limit")
            return
        cmd = [sys.executable, "-m", MODULE, "step", step.name, self.work, "--deadline", f"{deadline:.1f}"]
        cmd += ["--dry-run"] * self.settings.dry_run + ["--full-tests"] * self.settings.full_tests
        log_path = os.path.join(self.work, "logs", f"{step.name}.log")
        started = time.time()
        entry["status"] = "running"
        self.write()  # should the machine go away now, the summary names the step it was in
        print(f"[gpu_check] {step.name}: {step.what} (at most {deadline - started:.0f} s)", flush=True)
        with open(log_path, "w") as log:
            self.current = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=step_env(self.settings.dry_run),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = self.current.wait(timeout=max(deadline - time.time(), 0))
            except subprocess.TimeoutExpired:
                _kill_group(self.current)
                rc = None
            self.current = None
        result = _read_json(os.path.join(self.work, "results", f"{step.name}.json")) or {}
        entry.update(seconds=round(time.time() - started, 1), rc=rc, result=result, failures=result.get("failures", []))
        if rc is None:
            entry.update(
                status="timeout",
                reason=f"killed at its deadline after {entry['seconds']:.0f} s",
                log_tail=_tail(log_path),
            )
        elif rc != 0:
            entry.update(
                status="failed", reason="; ".join(entry["failures"]) or f"exited with {rc}", log_tail=_tail(log_path)
            )
        else:
            entry.update(status=result.get("status", "ok"), reason=result.get("reason"))
        print(
            f"[gpu_check] {step.name}: {entry['status']} in {entry['seconds']:.0f} s"
            + (f" ({entry['reason']})" if entry.get("reason") else ""),
            flush=True,
        )

    def finish(self, interrupted=None):
        for name, entry in self.summary["steps"].items():
            if entry["status"] == "running":  # stopped with the run: what it saved so far
                result = _read_json(os.path.join(self.work, "results", f"{name}.json")) or {}
                entry.update(status="timeout", reason=interrupted, result=result, failures=result.get("failures", []))
            elif entry["status"] == "pending":
                entry.update(status="skipped", reason=interrupted or "not reached")
        bad = [n for n, e in self.summary["steps"].items() if e["status"] in ("failed", "timeout")]
        self.summary.update(
            finished=_now(),
            wall_s=round(time.time() - self.start, 1),
            status="interrupted" if interrupted else ("failed" if bad else "ok"),
            failed_steps=bad,
        )
        self.write()
        shutil.rmtree(self.work, ignore_errors=True)
        return 0 if self.summary["status"] == "ok" else 1

    def interrupt(self, signum, frame):
        if self.current is not None:
            _kill_group(self.current)
        sys.exit(self.finish(interrupted=f"the run was stopped (signal {signum})"))

    def write(self):
        """summary.json, report.md, bench.json and logs.tar.gz, each replaced whole."""
        results = {n: e.get("result") or {} for n, e in self.summary["steps"].items()}
        _write_json(os.path.join(self.out, "bench.json"), bench_json(results))
        try:
            text = render_report(self.summary, results)
        except Exception:  # noqa: BLE001 - the summary must still be written
            text = "# GPU check\n\nThe report failed:\n\n```\n" + traceback.format_exc() + "```\n"
        with open(os.path.join(self.out, "report.md.tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(self.out, "report.md.tmp"), os.path.join(self.out, "report.md"))
        archive_logs(os.path.join(self.work, "logs"), os.path.join(self.out, "logs.tar.gz"))
        _write_json(os.path.join(self.out, "summary.json"), self.summary)


def _tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def archive_logs(folder, path):
    """The logs as one tar.gz, each cut to its first and last ``LOG_CAP_BYTES / 2`` bytes."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            size = os.path.getsize(full)
            if size <= LOG_CAP_BYTES:
                tar.add(full, arcname=f"logs/{name}")
                continue
            half = LOG_CAP_BYTES // 2
            with open(full, "rb") as f:
                head = f.read(half)
                f.seek(size - half)
                data = head + f"\n[... {size - 2 * half} bytes cut ...]\n".encode() + f.read()
            info = tarfile.TarInfo(f"logs/{name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def bench_json(results):
    """The op and model records in the layout ``python -m glmix_kernels.bench report`` reads
    (pytest-benchmark's: ``benchmarks[].extra_info`` and ``stats.median``), with the copy bandwidth."""
    env = results.get("env", {})
    records = results.get("bench", {}).get("records", []) + results.get("train", {}).get("records", [])
    benchmarks = [
        {
            "name": "-".join(str(r.get(k)) for k in ("op", "mode", "backend", "stage", "dtype")),
            "stats": {"median": r.get("time_s")},
            "extra_info": r,
        }
        for r in records
    ]
    return {
        "datetime": env.get("date", _now()),
        "commit": env.get("commit"),
        "machine_info": {"node": env.get("host"), "gpu": env.get("device", {}).get("name")},
        "copy_bandwidth": results.get("bench", {}).get("copy_bandwidth"),
        "benchmarks": benchmarks,
    }


# ------------------------------------------------------------------ report.md


def render_report(summary, results):
    from . import report

    env = results.get("env", {})
    device = env.get("device", {}).get("name", summary["device"])
    mode = "dry run (CPU tensors, tiny sizes)" if summary["dry_run"] else "GPU run"
    lines = [
        f"# GPU check: {device}, {summary['started']}",
        "",
        f"{mode}; status **{summary['status']}**; wall {summary['wall_s'] or '-'} s of a "
        f"{summary['time_limit_s']} s limit; commit {env.get('commit', '?')}"
        + (" (with local changes)" if env.get("dirty") else ""),
        "",
        "## Steps",
        "",
        "| step | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, e in summary["steps"].items():
        note = (e.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {e['status']} | {e.get('seconds', '-')} | {note} |")
    lines += _env_section(env) + _tests_section(results.get("tests", {}))
    lines += _sanitizer_section(results.get("sanitizer", {}))
    bench = results.get("bench", {})
    if bench.get("records"):
        lines += ["", f"## Ops: {BENCH_OP}, glnet_4g stages 1 and 3", "", report.markdown(bench["records"])]
        lines += _floor_section(bench)
    lines += _skipped_section("Ops", bench)
    trained = results.get("train", {})
    if trained.get("records"):
        lines += [
            "",
            "## Training step (forward, backward, AdamW; autocast in the dtype shown)",
            "",
            report.markdown(trained["records"]),
        ]
    lines += _skipped_section("Training step", trained)
    failures = [(n, f) for n, e in summary["steps"].items() for f in e.get("failures", [])]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {n}: {f}" for n, f in failures]
    return "\n".join(lines) + "\n"


def _env_section(env):
    if not env:
        return []
    v = env.get("versions", {})
    lines = [
        "",
        "## Machine",
        "",
        f"- device: {json.dumps(env.get('device'))}",
        f"- versions: python {env.get('python')}, torch {v.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"triton {v.get('triton')}, glmix_kernels {v.get('glmix_kernels')}",
        f"- nvcc: {env.get('nvcc')}",
        f"- compute-sanitizer: {env.get('compute-sanitizer')}",
        f"- host: {env.get('host')}, {env.get('cpus')} CPUs, {env.get('platform')}",
        f"- backends: {', '.join(f'{k}: {w}' for k, w in env.get('backends', {}).items())}",
    ]
    gpu = env.get("gpu", {})
    lines.append("- nvidia-smi: " + ", ".join(f"{k} {w}" for k, w in gpu.items()))
    return lines


def _tests_section(t):
    if not t:
        return []
    c = t.get("counts", {})
    lines = [
        "",
        "## Tests",
        "",
        f"`{' '.join(t.get('command', [])[1:])}`",
        "",
        f"passed {c.get('passed', '-')}, failed {c.get('failed', '-')}, errors {c.get('errors', '-')}, "
        f"skipped {c.get('skipped', '-')}; passed per backend: {t.get('passed_per_backend')}",
    ]
    lines += [f"- failed: {name}" for name in t.get("failed_tests", [])]
    lines += [f"- skipped ({n}): {reason}" for reason, n in t.get("skip_reasons", {}).items()]
    return lines


def _sanitizer_section(s):
    if not s:
        return []
    lines = ["", "## compute-sanitizer", "", f"backends {s.get('backends')}; tool {s.get('tool') or 'not found'}"]
    if s.get("reason"):
        lines.append(f"- {s['reason']}")
    lines += [f"- {tool}: exit {s[tool]['rc']}, errors {s[tool]['errors']}" for tool in SANITIZER_TOOLS if tool in s]
    return lines


def _floor_section(bench):
    from .report import format_bytes, format_time

    bw = bench.get("copy_bandwidth", {})
    gb = {k: f"{v / 1e9:.0f} GB/s" if v else "-" for k, v in bw.items() if k.endswith("Bps")}
    lines = [
        "",
        "### Fraction of the HBM floor",
        "",
        f"Copy bandwidth (device-to-device copy of {format_bytes(bw.get('bytes'))}, read + write): "
        f"{gb.get('before_Bps', '-')} before the ops, {gb.get('after_Bps', '-')} after; the floor uses the "
        f"better. Floor bytes per call, with P = B*L*C, Q = B*S*C, I = init_slots' elements, e bytes per "
        f"element: fwd (3P + 2Q + 2I) e, full (8P + 6Q + 6I) e: each tensor the ops read or write, once. "
        f"Fraction = floor time / time (1 = at the floor).",
        "",
        "| stage | mode | backend | time | floor bytes | floor time | fraction of floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in bench["records"]:
        fraction = f"{r['floor_fraction']:.3g}" if r.get("floor_fraction") else "-"
        lines.append(
            f"| {r.get('stage')} | {r['mode']} | {r['backend']} | {format_time(r.get('time_s'))} "
            f"| {format_bytes(r.get('floor_bytes'))} | {format_time(r.get('floor_s'))} | {fraction} |"
        )
    return lines


def _skipped_section(title, result):
    skipped = result.get("skipped", [])
    if not skipped:
        return []
    return ["", f"{title}, not run:", ""] + [
        f"- {' '.join(str(s[k]) for k in ('stage', 'backend') if k in s)}: {s['reason']}" for s in skipped
    ]


# ------------------------------------------------------------------ command line


def _steps(text):
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown steps {unknown}; steps: {','.join(STEP_NAMES)}")
    return [s for s in STEPS if s.name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny sizes")
    options.add_argument("--full-tests", action="store_true", help="the whole test suite, not the CUDA-tensor tests")
    options.add_argument("--steps", type=_steps, default=list(STEPS), help=f"a subset of {','.join(STEP_NAMES)}")
    options.add_argument("--time-limit", type=float, help="total seconds (default: the steps' budgets, 470 on a GPU)")
    run = commands.add_parser("run", parents=[options], help="the steps, into OUT_DIR")
    run.add_argument("out", metavar="OUT_DIR")
    commands.add_parser("limit", parents=[options], help="print the total time limit these options give")
    one = commands.add_parser("step", help="one step (what run starts, in its own process)")
    one.add_argument("name", choices=STEP_NAMES)
    one.add_argument("work")
    one.add_argument("--deadline", type=float, required=True, help="seconds since the epoch")
    one.add_argument("--dry-run", action="store_true")
    one.add_argument("--full-tests", action="store_true")
    kernels = commands.add_parser("kernels", help="one small call of each kernel (what the sanitizer runs)")
    kernels.add_argument("--device", default="cuda")
    kernels.add_argument("--backends", default="cuda")
    kernels.add_argument("--tiny", action="store_true", help="the smallest shape only")
    args = parser.parse_args(argv)

    if args.command == "kernels":
        return 1 if kernel_calls(args.device, args.backends.split(","), args.tiny) else 0
    settings = Settings(args.dry_run, args.full_tests)
    if args.command == "step":
        signal.signal(signal.SIGTERM, _stop_children)
        return run_step(args.name, args.work, settings, args.deadline)
    limit = args.time_limit or default_time_limit(args.steps, settings)
    if args.command == "limit":
        print(int(limit))
        return 0
    os.makedirs(args.out, exist_ok=True)
    check = Run(os.path.abspath(args.out), settings, args.steps, limit)
    signal.signal(signal.SIGTERM, check.interrupt)
    signal.signal(signal.SIGINT, check.interrupt)
    status = check.execute()
    print(
        f"[gpu_check] {check.summary['status']} in {check.summary['wall_s']:.0f} s; "
        f"results in {args.out}: {', '.join(OUT_FILES)}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
