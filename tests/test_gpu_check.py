"""scripts/gpu_check.sh: its dry run writes every file with each step's status, a failing step is
recorded and the next one runs, the time limit holds, and the pieces the GPU run depends on."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

import glmix_kernels
from glmix_kernels.bench import gpu_check, report, workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
MAX_FILE_BYTES = 16 << 20


def run_script(out, *args, env=None, timeout=300):
    env = dict(os.environ, **(env or {}), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", SCRIPT, *args, str(out)], cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return proc, summary


def check_out_dir(out, steps):
    """The four files, few and small enough to come back from a GPU machine, the logs archived."""
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES)
    assert len(files) <= 8 and all((out / f).stat().st_size < MAX_FILE_BYTES for f in files)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{s}.log" for s in steps} <= set(names), names


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc, summary = run_script(out, "--dry-run")
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, summary


def test_dry_run_writes_every_file_and_step_status(dry_run):
    out, summary = dry_run
    check_out_dir(out, gpu_check.STEP_NAMES)
    assert summary["dry_run"] and summary["status"] == "ok" and summary["finished"]
    assert summary["wall_s"] < summary["time_limit_s"]
    statuses = {name: step["status"] for name, step in summary["steps"].items()}
    assert statuses == {
        "install": "ok",
        "env": "ok",
        "tests": "ok",
        "sanitizer": "skipped",
        "bench": "ok",
        "train": "ok",
    }
    # No GPU: the sanitizer says so, and the kernel calls it would check ran.
    sanitizer = summary["steps"]["sanitizer"]
    assert "compute-sanitizer needs a GPU" in sanitizer["reason"] and sanitizer["result"]["calls_rc"] == 0


def test_dry_run_tests_each_fused_cpu_backend(dry_run):
    _, summary = dry_run
    result = summary["steps"]["tests"]["result"]
    fused = [b for b in glmix_kernels.available_backends("cpu") if b != "reference"]
    assert "cpu" in fused and result["backends"] == fused
    assert result["counts"]["failed"] == result["counts"]["errors"] == 0
    assert all(result["passed_per_backend"][b] > 0 for b in fused), result["passed_per_backend"]


def test_dry_run_benchmarks_every_timed_backend_against_the_floor(dry_run):
    out, summary = dry_run
    bench = summary["steps"]["bench"]["result"]
    timed = [b for b in gpu_check.DRY_RUN_TIMED if workloads.skip_reason(b, "cpu") is None]
    assert "cpu" in timed
    got = {(r["stage"], r["backend"], r["mode"]) for r in bench["records"]}
    assert got == {(s, b, m) for s in gpu_check.BENCH_STAGES for b in timed for m in gpu_check.BENCH_MODES}
    assert all(r["time_s"] > 0 and 0 < r["floor_fraction"] and r["floor_bytes"] > 0 for r in bench["records"])
    assert bench["copy_bandwidth"]["used_Bps"] > 0
    skipped = {(s["stage"], s["backend"]) for s in bench["skipped"]}
    assert {(s, "compile") for s in gpu_check.BENCH_STAGES} <= skipped  # said, not silently left out

    train = summary["steps"]["train"]["result"]
    trained = {r["backend"] for r in train["records"]}
    assert trained == {"reference", "cpu"}
    assert all(r["images_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in train["records"])

    # bench.json reads back through the report tool; report.md holds every section.
    records, _ = report.load([str(out / "bench.json")])
    assert len(records) == len(bench["records"]) + len(train["records"])
    text = (out / "report.md").read_text()
    for heading in (
        "## Steps",
        "## Machine",
        "## Tests",
        "## compute-sanitizer",
        "### Fraction of the HBM floor",
        "## Training step",
    ):
        assert heading in text


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path):
    # pip cannot open the constraints file: install fails; env, after it, still runs.
    proc, summary = run_script(
        tmp_path / "out", "--dry-run", "--steps", "install,env", env={"PIP_CONSTRAINT": str(tmp_path / "missing.txt")}
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert summary["status"] == "failed" and summary["failed_steps"] == ["install"]
    install = summary["steps"]["install"]
    assert install["status"] == "failed" and "pip install exited with 1" in install["reason"]
    assert summary["steps"]["env"]["status"] == "ok"
    check_out_dir(tmp_path / "out", ["install", "env"])
    assert "| install | failed |" in (tmp_path / "out" / "report.md").read_text()


def test_the_time_limit_stops_a_step(tmp_path):
    # 12 s less the report's 10 s leave the tests 2 s, less than pytest takes to collect them:
    # they are stopped, and the run still reports.
    proc, summary = run_script(tmp_path / "out", "--dry-run", "--steps", "tests", "--time-limit", "12")
    assert proc.returncode == 1
    assert summary["steps"]["tests"]["status"] == "timeout" and summary["wall_s"] < 12 + 5
    check_out_dir(tmp_path / "out", ["tests"])
    # pytest (its own process group, its JUnit file in the run's work folder) was stopped too.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert summary["work_dir"] not in ps


def test_usage_errors(tmp_path):
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run(["bash", SCRIPT, "--steps", "nope", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown steps" in proc.stderr


def test_deadlines_leave_later_steps_their_budgets():
    steps, gpu = gpu_check.STEPS, gpu_check.Settings(dry_run=False)
    limit = gpu_check.default_time_limit(steps, gpu)
    assert limit <= 480  # the GPU run fits in 8 minutes
    deadlines = gpu_check.step_deadlines(steps, 1000.0, limit, gpu)
    end = 1000.0 + limit - gpu_check.REPORT_RESERVE_S
    assert deadlines[-1] == end and deadlines[0] == 1000.0 + steps[0].gpu_budget_s
    assert all(deadlines[i + 1] - deadlines[i] == steps[i + 1].gpu_budget_s for i in range(len(steps) - 1))
    # Half the time: every budget halves.
    half = gpu_check.step_deadlines(steps, 0.0, (limit + gpu_check.REPORT_RESERVE_S) / 2, gpu)
    assert half[0] == pytest.approx(steps[0].gpu_budget_s / 2)


def test_floor_bytes_count_each_tensor_once():
    B, L, C, S, e = 2, 10, 3, 4, 2
    pixels, slot_sized = B * L * C, B * S * C
    # forward: cluster reads x, init_slots, writes slots; dispatch reads x, init_slots, slots, writes out
    fwd = (pixels + 2 * slot_sized) + (2 * pixels + 2 * slot_sized)
    assert gpu_check.floor_bytes("fwd", B, L, C, S, e) == fwd * e
    # backward: dispatch reads grad, x, init_slots, slots, writes dx, d_init_slots, dslots;
    # clustering reads grad, x, init_slots, slots, writes dx, d_init_slots
    bwd = (3 * pixels + 4 * slot_sized) + (2 * pixels + 4 * slot_sized)
    assert gpu_check.floor_bytes("full", B, L, C, S, e) == (fwd + bwd) * e


def test_sanitizer_summaries_are_read():
    assert gpu_check.sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert gpu_check.sanitizer_errors("========= ERROR SUMMARY: 3 errors\n") == 3
    racecheck = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    assert gpu_check.sanitizer_errors(racecheck) == 1
    assert gpu_check.sanitizer_errors("Segmentation fault\n") is None  # no summary: not a pass


def test_gpu_test_selection_finds_tests_of_both_backends():
    # Collected here without a GPU (the CUDA ids exist, skipped): the GPU run's quick selection
    # would otherwise first show it selects nothing on the GPU.
    paths, keyword, backends = gpu_check.test_selection(gpu_check.Settings(dry_run=False))
    assert backends == ["triton", "cuda"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *paths, "--collect-only", "-q", "-p", "no:cacheprovider", "-k", keyword],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for backend in backends:
        assert sum(f"{backend}-cuda" in i for i in ids) >= 20, proc.stdout[-2000:]
    assert any(i.startswith("tests/test_triton.py::") for i in ids)
    assert not any("-cpu" in i for i in ids)


def test_long_logs_are_cut_in_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOG_CAP_BYTES", 1000)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "big.log").write_bytes(b"a" * 600 + b"b" * 5000 + b"c" * 600)
    (logs / "small.log").write_text("ok")
    gpu_check.archive_logs(str(logs), str(tmp_path / "logs.tar.gz"))
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        big = tar.extractfile("logs/big.log").read()
        assert tar.extractfile("logs/small.log").read() == b"ok"
    assert big.startswith(b"a" * 500) and big.endswith(b"c" * 500) and b"bytes cut" in big and len(big) < 1100


FAKE_SANITIZER = """#!/usr/bin/env bash
# Stands in for compute-sanitizer: records its arguments, prints the summary it is told to.
echo "$@" >> "$CALLS"
case "$*" in
  *racecheck*) echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" ;;
  *) echo "========= ERROR SUMMARY: $ERRORS errors"; [ "$ERRORS" = 0 ] || exit 3 ;;
esac
"""


@pytest.mark.parametrize("errors", [0, 2])
def test_sanitizer_runs_both_tools_over_the_kernel_calls(tmp_path, monkeypatch, errors):
    # The GPU branch of the step, with a stand-in for the tool: what it runs, how it judges.
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(FAKE_SANITIZER)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("ERRORS", str(errors))
    import time

    result = gpu_check.sanitizer(gpu_check.Settings(dry_run=False), time.time() + 60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[1] for c in calls] == ["memcheck", "racecheck"]
    assert all(c.endswith(f"-m {gpu_check.MODULE} kernels --device cuda --backends cuda") for c in calls)
    assert result["racecheck"] == {"rc": 0, "errors": 0}
    if errors:
        assert result["memcheck"] == {"rc": 3, "errors": 2} and result["failures"] == ["memcheck: exit 3, errors 2"]
    else:
        assert result["memcheck"] == {"rc": 0, "errors": 0} and result["failures"] == []
