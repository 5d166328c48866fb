"""The CPU target of benchmarks/results/cpu/README.md, timed so that the comparison survives a noisy machine.

``python benchmarks/interleaved.py THREADS``: cluster+dispatch forward+backward at
B=8, L=3136, C=64, S=64, fp32, on the benchmarks' own workloads (NCHW view, three rotating input
sets). pytest-benchmark times one backend after another, and the eager reference's time moves by
15-25% between processes and minutes on a shared VM; here 7 rounds alternate between the backends
and the figure is the median of the rounds' medians (8 calls each), with the rounds' range.
"""

import statistics
import sys
import time

import torch

from glmix_kernels.bench import workloads

BACKENDS = ("reference", "compile", "cpu")
ROUNDS, CALLS, INPUT_SETS = 7, 8, 3


def main(threads):
    torch.set_num_threads(threads)
    runs = {
        b: workloads.op_workload("cluster+dispatch", b, "full", 8, 3136, 64, 64, torch.float32, "cpu") for b in BACKENDS
    }
    inputs = {b: [runs[b].make_inputs() for _ in range(INPUT_SETS)] for b in BACKENDS}
    for b in BACKENDS:  # warm-up, compilation included
        for i in range(4):
            runs[b].run(*inputs[b][i % INPUT_SETS])
    rounds = {b: [] for b in BACKENDS}
    for _ in range(ROUNDS):
        for b in BACKENDS:
            times = []
            for i in range(CALLS):
                start = time.perf_counter()
                runs[b].run(*inputs[b][i % INPUT_SETS])
                times.append(time.perf_counter() - start)
            rounds[b].append(statistics.median(times) * 1e3)
    med = {b: statistics.median(v) for b, v in rounds.items()}
    print(
        f"threads={threads} "
        + "  ".join(f"{b} {med[b]:.2f} ms [{min(rounds[b]):.1f}-{max(rounds[b]):.1f}]" for b in BACKENDS),
        f"| reference/cpu {med['reference'] / med['cpu']:.2f}x  compile/cpu {med['compile'] / med['cpu']:.2f}x",
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
