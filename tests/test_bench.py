"""The benchmark tooling (glmix_kernels.bench): report, memory measurement, quick job."""

import json
import sys

import pytest
import torch

from glmix_kernels.bench import quick, report, timing, workloads


def _bench(op, backend, mode, shape, median, peak_mem_bytes=2_000_000, **extra):
    info = dict(
        op=op,
        backend=backend,
        mode=mode,
        dtype="float32",
        device="cpu",
        shape=shape,
        peak_mem_bytes=peak_mem_bytes,
        versions={"torch": torch.__version__},
        **extra,
    )
    return {"name": f"test[{op}-{backend}]", "stats": {"median": median}, "extra_info": info}


@pytest.fixture
def results(tmp_path):
    """A small pytest-benchmark JSON file: ops at one shape, a model at two resolutions, an OOM."""
    op_shape = dict(B=2, L=3136, C=64, S=64)
    benchmarks = [
        _bench("cluster", "reference", "fwd", op_shape, 0.004),
        _bench("cluster", "compile", "fwd", op_shape, 0.002),
        # A GPU record: the CUDA-event time in extra_info wins over pytest-benchmark's median.
        _bench("cluster", "cpu", "fwd", op_shape, 0.5, time_s=0.001),
        {"name": "not ours", "stats": {"median": 1.0}, "extra_info": {}},
    ]
    for res, t in ((224, 0.1), (512, 0.5)):
        shape = dict(B=2, H=res, W=res)
        benchmarks += [
            _bench("glnet_4g", "reference", "train", shape, t),
            _bench("glnet_4g", "cpu", "train", shape, t / 4),
        ]
    benchmarks.append(
        _bench("glnet_4g", "mha_nchw", "train", dict(B=2, H=512, W=512), 1e-6, peak_mem_bytes=None, oom=True)
    )
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"datetime": "2026-11-21T00:00:00", "machine_info": {"node": "test"}, "benchmarks": benchmarks})
    )
    return path


def _row(table, op, shape, backend):
    """The cells of the one table row with these op (or model), shape and backend columns."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    found = [r for r in rows if (r[0], r[4], r[5]) == (op, shape, backend)]
    assert len(found) == 1, f"expected one row for {op}, {shape}, {backend}; got {found}"
    return found[0]


def test_report_table(results):
    records, _ = report.load([results])
    assert len(records) == 8  # the benchmark without our extra_info is left out
    text = report.markdown(records)
    # op table columns: op, mode, device, dtype, shape, backend, time, vs reference, vs compile, memory
    assert _row(text, "cluster", "2x3136x64x64", "cpu")[6:] == ["1.00 ms", "4.00x", "2.00x", "2.0 MB"]
    assert _row(text, "cluster", "2x3136x64x64", "compile")[6:9] == ["2.00 ms", "2.00x", "1.00x"]
    # model table columns: model, mode, device, dtype, shape, backend, time, images/s, vs reference, memory
    assert _row(text, "glnet_4g", "2x512x512", "cpu")[6:9] == ["125.00 ms", "16.0", "4.00x"]
    assert _row(text, "glnet_4g", "2x512x512", "mha_nchw")[6:] == ["OOM", "-", "-", "-"]


def test_report_writes_markdown_and_plot(results, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    report.main([str(results)], str(out))
    text = (out / report.REPORT_NAME).read_text()
    assert "| glnet_4g | train |" in text and f"]({report.PLOT_NAME})" in text
    png = (out / report.PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "plot written" in capsys.readouterr().out


def test_report_without_matplotlib(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    records, _ = report.load([results])
    written, message = report.plot(records, str(tmp_path / "plot.png"))
    assert not written and "matplotlib is not installed" in message
    assert not (tmp_path / "plot.png").exists()


def test_saved_bytes_counts_each_storage_once():
    a = torch.randn(1000, requires_grad=True)  # 4000 bytes
    b = torch.randn(250, requires_grad=True)

    def forward():
        # a * a saves a twice (one storage); exp saves its 1000-byte result; a view of a saves a.
        return (a * a).sum() + b.exp().sum() + a[::2].sin().sum()

    loss, nbytes = timing.saved_bytes(forward)
    assert nbytes == 4000 + 1000
    loss.backward()  # what was saved is still valid after the hooks
    with torch.no_grad():
        assert timing.saved_bytes(forward)[1] == 0


@pytest.fixture
def one_thread():
    # Tiny shapes gain nothing from threads, and on shared cores every OpenMP barrier can wait a
    # time slice for a descheduled thread: one thread keeps this file fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_comparison_at_tiny_shape(one_thread):
    # compile is left out: compiling takes longer than this whole file may.
    backends = ["reference", "sdpa"] + [b for b in workloads.model_backends("cpu") if b != "reference"]
    records, failures = quick.compare_ops(
        "cpu", B=2, L=37, C=8, S=5, dtype=torch.float32, backends=backends, target_s=0.01
    )
    assert failures == []
    assert [(r["backend"], r["mode"]) for r in records] == [(b, m) for b in backends for m in ("fwd", "full")]
    assert all(r["time_s"] > 0 and r["peak_mem_bytes"] > 0 for r in records)
    assert "| cluster+dispatch | full | cpu | float32 | 2x37x8x5 | sdpa |" in report.markdown(records)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_workload_modes_agree(backend):
    # bwd's gradients (its forward recorded by make_inputs) equal full's on the same inputs.
    torch.manual_seed(0)
    bwd = workloads.op_workload("cluster+dispatch", backend, "bwd", 2, 20, 8, 4, torch.float32, "cpu")
    assert bwd.single_use
    out, leaves, g = bwd.make_inputs()
    fresh = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    grads = bwd.run(out, leaves, g)
    full = workloads.op_workload("cluster+dispatch", backend, "full", 2, 20, 8, 4, torch.float32, "cpu")
    for a, e in zip(grads, full.run(*fresh, g)):
        torch.testing.assert_close(a, e)


def test_feed_rotates_reusable_sets_and_never_repeats_single_use_ones():
    made = []

    def make():
        made.append(len(made))
        return (made[-1],)

    reusable = timing.feed(make, "cpu")
    assert [next(reusable) for _ in range(5)] == [(0,), (1,), (0,), (1,), (0,)]
    made.clear()
    single = timing.feed(make, "cpu", single_use=True)
    assert [next(single) for _ in range(5)] == [(i,) for i in range(5)]


def test_local_mixer_variant_skips_the_global_branch(monkeypatch):
    import glmix_kernels.models.glnet as glnet

    model = workloads.build_mixer_model(workloads.MIXER_LOCAL, depth=[1, 1, 1, 1], num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, glnet.GLMixBlock)]
    assert blocks and not any(m.use_global_branch for m in blocks)

    def fail(*args, **kwargs):
        raise AssertionError("the local-only variant ran the global branch")

    monkeypatch.setattr(glnet, "soft_cluster", fail)
    monkeypatch.setattr(glnet, "soft_dispatch", fail)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_reference_error_of_a_cancelling_d_scale(one_thread, monkeypatch):
    tol = quick.TOLERANCE[torch.float32]
    shape = dict(B=1, L=196, C=64, S=64, dtype=torch.float32, device="cpu")
    # Inputs where d scale cancels to under 1% of the root sum of squares of its terms: there the
    # float32 reference's own rounding, relative to d scale's value, exceeds the tolerance.
    torch.manual_seed(883)
    x, s0, scale, slots, g = workloads.op_inputs("cluster+dispatch", **shape)
    ref = workloads.op_function("cluster+dispatch", "reference")
    d_scale = workloads._grads(workloads.op_forward(ref, x, s0, scale, slots), (x, s0, scale), g)[2]
    assert d_scale.abs() < 0.01 * (g * workloads._scale_tangent(ref, x, s0, scale, slots)).norm()
    torch.manual_seed(883)
    assert workloads.reference_error("cluster+dispatch", "reference", **shape) == 0
    torch.manual_seed(883)
    assert workloads.reference_error("cluster+dispatch", "sdpa", **shape) <= tol
    # A d scale 1% off its typical size is still an error.
    sdpa_cluster = workloads._sdpa_cluster

    def off(x, init_slots, scale, slots=None):
        return sdpa_cluster(x, init_slots, scale * 1.01 - scale.detach() * 0.01)

    monkeypatch.setattr(workloads, "_sdpa_cluster", off)
    torch.manual_seed(0)
    assert workloads.reference_error("cluster", "sdpa", **shape) > tol


def test_quick_comparison_flags_a_wrong_fused_backend(monkeypatch):
    fused = [b for b in workloads.model_backends("cpu") if b != "reference"]
    if not fused:
        pytest.skip("no fused backend runs on this machine's CPU")
    monkeypatch.setattr(workloads, "reference_error", lambda *args: 1.0)
    _, failures = quick.compare_ops(
        "cpu", B=1, L=4, C=2, S=2, dtype=torch.float32, backends=["reference", "sdpa"] + fused, modes=()
    )
    # The baselines are shown, not judged; each fused backend fails.
    assert [f.split("'")[1] for f in failures] == fused


def test_model_check_catches_a_wrong_backend(monkeypatch):
    """The main job's model check fails when a backend's ops are wrong, and passes when right."""
    from glmix_kernels.bench import quick, workloads
    from glmix_kernels.models import glnet

    monkeypatch.setattr(workloads, "model_backends", lambda device: ["reference", "auto"])
    assert quick.check_model("cpu", torch.float32, batch=1, resolution=64) == []
    right = glnet.soft_dispatch
    calls = iter(range(10**6))

    def wrong_on_second_pass(*args, **kwargs):  # the second model pass plays the broken backend
        out = right(*args, **kwargs)
        return out * 1.5 if next(calls) >= len(DISPATCHING_BLOCKS) else out

    DISPATCHING_BLOCKS = [m for m in quick.create_model("glnet_4g").modules() if isinstance(m, glnet.GLMixBlock)]
    monkeypatch.setattr(glnet, "soft_dispatch", wrong_on_second_pass)
    failures = quick.check_model("cpu", torch.float32, batch=1, resolution=64)
    assert len(failures) == 1 and "eval logits differ" in failures[0]
