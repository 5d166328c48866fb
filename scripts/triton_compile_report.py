"""Compile every Triton kernel of the ``triton`` backend for sm_80 and sm_90 without a GPU, at the
GLNet stage shapes (glnet_4g stages 1-4, B=128, S=64; bf16 and fp32), and report per
configuration: registers, spilled bytes, shared memory and whether the products run on tensor
cores. Exits non-zero when any configuration the backend may launch (the pinned one, or one the
opt-in autotuner may pick) spills or needs more shared memory than one block may have
(``MAX_SHARED_BYTES``).

    python scripts/triton_compile_report.py --out report.json [--jobs N]

How: the backend's own launchers run on CPU tensors with the launch replaced by a recorder, so
every kernel gets exactly the arguments (strides, constexprs, configs) a GPU call would give it;
Triton's binder turns them into a signature for a ``GPUTarget``, ``triton.compile`` builds it,
and the ptxas that Triton runs on the PTX reports registers and spills (``-v``). Tensor cores
show in the PTX as ``mma.sync`` (sm_80) or ``wgmma`` (sm_90a).

Kept short for CI (a few minutes on 2 cores; one compilation takes 3-5 s of one core):
- a compilation depends on the shape only through the constexprs and the integer
  specialisations (divisibility by 16, equality to 1): identical compilations of different stages
  or ops are built once;
- the pinned configurations (what every call launches) are compiled for sm_80 and sm_90; the
  other candidates of the opt-in autotuner (GLMIX_TRITON_AUTOTUNE=1) for sm_90 only, the GPUs
  the project runs on;
- results are cached in ``~/.cache/glmix-kernels/triton-compile-report.json`` under a hash of the
  compilation's inputs, the kernels' source and the Triton version, so a run with unchanged
  kernels recompiles nothing (``--no-cache`` to ignore it);
- the compilations run in parallel on all cores.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default, stated (3.9 warns)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from glmix_kernels.backends import triton as tb  # noqa: E402

ARCHS = (80, 90)
# The most shared memory one block may use (opt-in), per arch: sm_80 163 KB, sm_90 227 KB.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCH, SLOTS = 128, 64
SM_COUNT = 132  # an H100 SXM: decides the chunk plan, as on the GPU
# (C, L) of glnet_4g's four stages at 224x224 input (stage 4 has no GLMix block in glnet_4g, but
# its shape is the largest C any released model gives the kernels at that resolution).
STAGES = {"s1": (64, 3136), "s2": (128, 784), "s3": (256, 196), "s4": (512, 49)}


def _record_launches(op, *args):
    """The kernels ``op`` launches: (JITFunction, [triton.Config], kwargs) each."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def record(**kwargs):
                k = self.kernel
                if isinstance(k, Autotuner):
                    launches.append((k.fn, k.configs, kwargs))
                else:  # a plain launch: its options are launch arguments
                    options = {o: kwargs.pop(o) for o in ("num_warps", "num_stages") if o in kwargs}
                    launches.append((k, [triton.Config({}, **options)], kwargs))

            return record

    saved = tb._launch, tb._check, tb._programs_wanted, tb.AUTOTUNE
    tb._launch, tb._check, tb.AUTOTUNE = Recorder, (lambda *a, **k: None), True  # every candidate
    tb._programs_wanted = lambda device: 2 * SM_COUNT
    try:
        op(*args)
    finally:
        tb._launch, tb._check, tb._programs_wanted, tb.AUTOTUNE = saved
    return launches


def _op_calls(C, L, dtype):
    """Every op of the backend once, on CPU tensors in the model's layouts (x an NCHW view,
    broadcast learned slots, pooled per-batch slots)."""
    B, S = BATCH, SLOTS
    x = torch.empty(B, C, L, dtype=dtype).transpose(1, 2)
    init_slots = torch.empty(B, S, C, dtype=dtype)
    scale = torch.empty((), dtype=torch.float32)
    slots = torch.empty(B, S, C, dtype=dtype)
    slots32 = torch.empty(B, S, C, dtype=torch.float32)
    return [
        (tb.cluster_fwd, (x, init_slots, scale)),
        (tb.dispatch_fwd, (x, init_slots, scale, slots)),
        (tb.cluster_bwd, (torch.empty(B, S, C, dtype=dtype), x, init_slots, scale, slots32, torch.empty(B, S))),
        (tb.dispatch_bwd, (torch.empty(B, L, C, dtype=dtype), x, init_slots, scale, slots, torch.empty(B, L))),
    ]


def _bind(fn, config, kwargs, arch):
    """Signature, constexprs, attributes and options of one compilation, from Triton's binder."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _config_name(fn, config, kwargs):
    meta = {**kwargs, **config.all_kwargs()}
    keys = ("BLOCK_S", "BLOCK_L", "BLOCK_C", "SCORE_C", "BLOCK", "NUM_STAGES", "num_warps", "num_stages", "CLUSTER")
    return ",".join(f"{k}={meta[k]}" for k in keys if k in meta)


def _compile(job):
    """Worker: compile one job, return (registers, spill bytes, shared bytes, tensor cores)."""
    name, arch, signature, constexprs, attrs, options = job
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    fn = getattr(tb.kernels, name)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    ptx = compiled.asm["ptx"]
    tensor_cores = bool(re.search(r"\b(wgmma|mma\.sync)\b", ptx))
    return regs, spills, compiled.metadata.shared, tensor_cores


CACHE = os.path.expanduser("~/.cache/glmix-kernels/triton-compile-report.json")


def _job_hash(key):
    with open(tb.kernels.__file__, "rb") as f:
        source = f.read()
    return hashlib.sha256(source + triton.__version__.encode() + key.encode()).hexdigest()


def collect_jobs(stages=tuple(STAGES), dtypes=tuple(DTYPES)):
    """(records without results, {job key: job}) for every kernel x arch x stage x dtype x config."""
    records, jobs = [], {}
    for stage in stages:
        C, L = STAGES[stage]
        for dname in dtypes:
            dtype = DTYPES[dname]
            for op, args in _op_calls(C, L, dtype):
                for fn, configs, kwargs in _record_launches(op, *args):
                    for i, config in enumerate(configs):
                        for arch in ARCHS if i == 0 else ARCHS[-1:]:  # configs[0]: the pinned one
                            sig, constexprs, attrs, options = _bind(fn, config, kwargs, arch)
                            job = (fn.__name__, arch, sig, constexprs, attrs, options)
                            key = _job_hash(repr(job))
                            jobs[key] = job
                            records.append(
                                dict(
                                    kernel=fn.__name__,
                                    op=op._name if hasattr(op, "_name") else str(op),
                                    arch=f"sm_{arch}",
                                    shape=dict(B=BATCH, L=L, C=C, S=SLOTS, stage=stage),
                                    dtype=dname,
                                    config=_config_name(fn, config, kwargs),
                                    _key=key,
                                )
                            )
    return records, jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON report to write")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()

    start = time.time()
    records, jobs = collect_jobs(args.stages, args.dtypes)
    results = {} if args.no_cache else _read_cache()
    keys = [k for k in jobs if k not in results]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every compilation runs ptxas
        with ProcessPoolExecutor(args.jobs) as pool:
            for i, (key, result) in enumerate(zip(keys, pool.map(_compile, [jobs[k] for k in keys]))):
                results[key] = result
                if i % 8 == 7:  # an interrupted run keeps what it compiled
                    _write_cache(results)
    _write_cache(results)
    for r in records:
        r["registers"], r["spill_bytes"], r["shared_bytes"], r["tensor_cores"] = results[r.pop("_key")]
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)

    spilled = [r for r in records if r["spill_bytes"]]
    too_big = [r for r in records if r["shared_bytes"] > MAX_SHARED_BYTES[int(r["arch"][3:])]]
    print(
        f"{len(records)} records, {len(jobs)} compilations ({len(keys)} not cached), triton {triton.__version__}, "
        f"{time.time() - start:.0f} s on {args.jobs} processes; {len(spilled)} spill, "
        f"{len(too_big)} over the shared-memory limit"
    )
    _print_summary(records)
    for r in spilled:
        print(
            f"SPILL: {r['kernel']} {r['arch']} {r['shape']['stage']} {r['dtype']} {r['config']}: "
            f"{r['spill_bytes']} bytes",
            file=sys.stderr,
        )
    for r in too_big:
        print(
            f"SHARED: {r['kernel']} {r['arch']} {r['shape']['stage']} {r['dtype']} {r['config']}: "
            f"{r['shared_bytes']} bytes",
            file=sys.stderr,
        )
    return 1 if spilled or too_big else 0


def _read_cache():
    try:
        with open(CACHE) as f:
            return {k: tuple(v) for k, v in json.load(f).items()}
    except (OSError, ValueError):
        return {}


def _write_cache(results):
    """Adds ``results`` to the cache (other runs' entries stay)."""
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    merged = {**_read_cache(), **results}
    with open(CACHE + ".tmp", "w") as f:
        json.dump(merged, f)
    os.replace(CACHE + ".tmp", CACHE)


def _print_summary(records):
    """Per kernel, arch and dtype: the register range, spills, shared memory, tensor cores."""
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    for (kernel, arch, dtype), rs in sorted(groups.items()):
        regs = [r["registers"] for r in rs]
        print(
            f"{kernel:20s} {arch} {dtype}: registers {min(regs)}-{max(regs)}, "
            f"spills {sum(r['spill_bytes'] > 0 for r in rs)}/{len(rs)}, "
            f"shared <= {max(r['shared_bytes'] for r in rs)} B, "
            f"tensor cores {_share(r['tensor_cores'] for r in rs)}"
        )


def _share(flags):
    flags = list(flags)
    return "yes" if all(flags) else "no" if not any(flags) else "some"


if __name__ == "__main__":
    sys.exit(main())
