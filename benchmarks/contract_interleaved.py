"""One fused call per op, before and after: ``cpu`` against the eager reference, torch.compile of
the reference, and the ``cpu`` backend of another checkout (the code before the change), timed
interleaved so the ratios survive a noisy machine.

``python benchmarks/contract_interleaved.py BEFORE_TREE [THREADS]``: cluster+dispatch
forward+backward, fp32, on the benchmarks' own workloads (NCHW views), at glnet_4g's stages 1, 3
and 4 with B=2 and stage 4 with B=1. Each tree runs in its own worker process (both register ops
named glmix_kernels::*); per shape, ROUNDS rounds alternate over every (tree, backend) with CALLS
calls each, and a figure is the median of the rounds' medians (the fastest single calls are printed
too: on a loaded machine they show the work without preemption). The reference runs in both workers:
their ratio shows how far the two processes differ for the same code.
"""

import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"4g.s1 B=2": (2, 3136, 64), "4g.s3 B=2": (2, 196, 256), "4g.s4 B=2": (2, 49, 512), "4g.s4 B=1": (1, 49, 512)}
S = 64
ROUNDS, CALLS, INPUT_SETS, WARMUP = 9, 10, 3, 4


def worker(threads):
    """Answers the parent's JSON lines: build a shape's workloads, or time calls of one backend."""
    import torch

    from glmix_kernels.bench import workloads

    torch.set_num_threads(threads)
    runs, inputs = {}, {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if "shape" in cmd:
            B, L, C = cmd["shape"]
            for b in cmd["backends"]:
                runs[b] = workloads.op_workload("cluster+dispatch", b, "full", B, L, C, S, torch.float32, "cpu")
                inputs[b] = [runs[b].make_inputs() for _ in range(INPUT_SETS)]
                for i in range(WARMUP):  # compilation included
                    runs[b].run(*inputs[b][i % INPUT_SETS])
            reply = "ready"
        else:
            b, times = cmd["time"], []
            for i in range(CALLS):
                start = time.perf_counter()
                runs[b].run(*inputs[b][i % INPUT_SETS])
                times.append(time.perf_counter() - start)
            reply = [statistics.median(times), min(times)]
        print(json.dumps(reply), flush=True)


def start(tree, threads):
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", str(threads)],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def ask(proc, **cmd):
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main(before_tree, threads):
    after_tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    procs = {"after": start(after_tree, threads), "before": start(before_tree, threads)}
    timed = {"after": ("reference", "compile", "cpu"), "before": ("reference", "cpu")}
    print(f"threads={threads}, {ROUNDS} rounds x {CALLS} calls, medians of round medians (ms)")
    for name, shape in SHAPES.items():
        for tree, proc in procs.items():
            assert ask(proc, shape=shape, backends=timed[tree]) == "ready"
        rounds = {(t, b): [] for t in procs for b in timed[t]}
        fastest = dict.fromkeys(rounds, float("inf"))
        for _ in range(ROUNDS):
            for t, b in rounds:
                median, least = ask(procs[t], time=b)
                rounds[(t, b)].append(median * 1e3)
                fastest[(t, b)] = min(fastest[(t, b)], least * 1e3)
        med = {k: statistics.median(v) for k, v in rounds.items()}
        cpu, old = med[("after", "cpu")], med[("before", "cpu")]
        print(
            f"{name}: cpu {cpu:.3f}, cpu before {old:.3f}, reference {med[('after', 'reference')]:.3f}, "
            f"compile {med[('after', 'compile')]:.3f} | before/after {old / cpu:.2f}x, "
            f"reference/cpu {med[('after', 'reference')] / cpu:.2f}x, "
            f"compile/cpu {med[('after', 'compile')] / cpu:.2f}x, "
            f"reference before/after workers {med[('before', 'reference')] / med[('after', 'reference')]:.2f}x",
            flush=True,
        )
        print("  fastest calls: " + ", ".join(f"{t} {b} {v:.3f}" for (t, b), v in fastest.items()), flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
    else:
        main(os.path.abspath(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
