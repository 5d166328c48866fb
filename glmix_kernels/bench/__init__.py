"""Benchmark tooling of glmix-kernels: the quick job, the report, the GPU check, and the timing
and workloads shared with the pytest benchmarks in ``benchmarks/``.

    python -m glmix_kernels.bench                    # quick check and op comparison on this device
    python -m glmix_kernels.bench report R.json ...  # markdown table + plot from pytest-benchmark JSON
    bash scripts/gpu_check.sh OUT_DIR                # everything on a GPU machine (gpu_check.py)
"""
