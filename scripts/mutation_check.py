"""Mutation check of the CUDA kernels under the emulation (docs/emulation.md): shows that the
emulated test suite fails without each __syncthreads of the kernels, and with an off-by-one in a
tail mask.

    GLMIX_CUDA_EMULATION=1 python3 setup.py build_ext --inplace   # once
    python3 scripts/mutation_check.py                              # about 15-20 minutes on 2 cores
    python3 scripts/mutation_check.py --tail-only                  # the tail mask alone

Barriers: each `__syncthreads()` line of csrc/cuda/*.cuh is left out in turn at run time (the
emulation's GLMIX_EMU_SKIP_BARRIER=file:line makes that barrier return at once, as if the line were
deleted; no rebuild), and the emulated tests must fail. The tail mask: the source is edited, the
extension rebuilt, the tests run, and the source restored and rebuilt. Exit status 0 when every
mutant is caught.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_emulation.py", "tests/test_ops.py", "-k", "emulated or kernels_are or read_nothing"]
# (file, the text, its off-by-one replacement; the first occurrence is replaced): in
# cluster_fwd_chunk the last pixel tile of a chunk reads and counts one pixel too many.
TAIL_MUTANT = (
    "csrc/cuda/cluster_kernels.cuh",
    "const int64_t l_end = min(static_cast<int64_t>(L), l_begin + chunk_len);",
    "const int64_t l_end = min(static_cast<int64_t>(L) + 1, l_begin + chunk_len);",
)


def barrier_sites():
    sites = []
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc", "cuda"))):
        if not name.endswith(".cuh"):
            continue
        with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
            for i, line in enumerate(f, 1):
                if re.search(r"\b__syncthreads\(\)", line) and not line.lstrip().startswith("//"):
                    sites.append(f"{name}:{i}")
    return sites


def run_tests(env_extra):
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return p.returncode, (tail[0] if tail else p.stdout.strip().splitlines()[-1])


def check_barrier(site):
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        rc, first = run_tests({"GLMIX_EMU_SKIP_BARRIER": site, "GLMIX_EMU_SKIP_LOG": log.name})
        reached = bool(log.read().strip())
    if not reached:
        return "NOT REACHED", first
    return ("caught" if rc != 0 else "SURVIVED"), first


def build():
    env = dict(os.environ, GLMIX_CUDA_EMULATION="1")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env, check=True, capture_output=True
    )


def check_tail_mask():
    path, old, new = TAIL_MUTANT
    full = os.path.join(ROOT, path)
    with open(full) as f:
        text = f.read()
    assert old in text, f"{path}: the tail mask to mutate is not there"
    try:
        with open(full, "w") as f:
            f.write(text.replace(old, new, 1))
        build()
        rc, first = run_tests({})
    finally:
        with open(full, "w") as f:
            f.write(text)
        build()
    return ("caught" if rc != 0 else "SURVIVED"), first


def main():
    rc, first = run_tests({})
    assert rc == 0, f"the emulated tests fail without any mutation: {first}"
    results = []
    for site in [] if "--tail-only" in sys.argv else barrier_sites():
        t0 = time.time()
        verdict, first = check_barrier(site)
        results.append(verdict)
        print(f"{verdict:12s} __syncthreads {site:32s} {time.time() - t0:5.0f} s  {first}", flush=True)
    t0 = time.time()
    verdict, first = check_tail_mask()
    results.append(verdict)
    print(f"{verdict:12s} tail mask {TAIL_MUTANT[0]} (l_end + 1) {time.time() - t0:5.0f} s  {first}", flush=True)
    caught = results.count("caught")
    print(f"{caught} of {len(results)} mutants caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
