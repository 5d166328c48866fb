"""Turns pytest-benchmark JSON files from ``benchmarks/`` into a markdown report and a plot.

    python -m glmix_kernels.bench report RESULTS.json [...] [--out DIR]

Each benchmark is read as a record: its ``extra_info`` (op, backend, mode, dtype, device, shape,
peak_mem_bytes, versions) plus ``time_s``, the median seconds per call (the CUDA-event median
on a GPU, pytest-benchmark's own median on the CPU). The quick job builds the same records.
"""

import json
import os

PLOT_NAME = "time_vs_resolution.png"
REPORT_NAME = "report.md"
_MODE_ORDER = ("fwd", "bwd", "full", "infer", "train")


def record(*, op, backend, mode, dtype, device, shape, peak_mem_bytes, **extra):
    """One benchmark's description: what a benchmark's ``extra_info`` carries and what the
    tables read (plus ``time_s``; ``extra`` adds fields such as ``oom``)."""
    from . import timing

    return dict(
        op=op,
        backend=backend,
        mode=mode,
        dtype=dtype,
        device=timing.device_name(device),
        shape=dict(shape),
        peak_mem_bytes=peak_mem_bytes,
        versions=timing.versions(),
        **extra,
    )


def records_from_json(data):
    """The records of one pytest-benchmark JSON document (benchmarks without our extra_info are
    not ours and are left out)."""
    records = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        record = dict(info)
        record["time_s"] = None if info.get("oom") else info.get("time_s", bench["stats"]["median"])
        records.append(record)
    return records


def load(paths):
    """``(records, sources)`` from pytest-benchmark JSON files; ``sources`` describes each file."""
    records, sources = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        records += records_from_json(data)
        machine = data.get("machine_info", {})
        cpu = machine.get("cpu", {}).get("brand_raw", "")
        sources.append(
            f"{os.path.basename(path)}: {data.get('datetime', '?')}, host {machine.get('node', '?')}"
            + (f", {cpu}" if cpu else "")
        )
    return records, sources


def format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def format_bytes(n):
    if n is None:
        return "-"
    if n == 0:
        return "0"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.1f} MB"


def _ratio(baseline, t):
    return f"{baseline / t:.2f}x" if baseline and t else "-"


def _backend_order():
    # The benchmarks' own order (reference, baselines, then the registry's); imported late so
    # reading a report does not load the models.
    from .workloads import OP_BACKENDS

    return OP_BACKENDS


def _order(value, known):
    return (known.index(value), "") if value in known else (len(known), value)


def _is_op(record):
    return "L" in record["shape"]


def _group_key(r):
    shape = r["shape"]
    size = (shape.get("C", 0), shape.get("L", 0)) if _is_op(r) else (shape.get("H", 0), shape.get("B", 0))
    return (r["device"], r["dtype"], r["op"], _order(r["mode"], _MODE_ORDER), size, shape.get("B", 0))


def _rows(records):
    """Records sorted into groups (same op, mode, dtype, device and shape), each with its
    baselines' times: ``[(record, reference_time, compile_time)]``."""
    groups = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    rows = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda r: _order(r["backend"], _backend_order()))
        base = {r["backend"]: r["time_s"] for r in reversed(group)}  # the first of each backend wins
        rows += [(r, base.get("reference"), base.get("compile")) for r in group]
    return rows


def op_table(records):
    lines = [
        "| op | mode | device | dtype | B x L x C x S | backend | time | vs reference | vs compile | memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, ref, comp in _rows([r for r in records if _is_op(r)]):
        s = r["shape"]
        t = r["time_s"]
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['device']} | {r['dtype']} | {s['B']}x{s['L']}x{s['C']}x{s['S']} "
            f"| {r['backend']} | {'OOM' if r.get('oom') else format_time(t)} | {_ratio(ref, t)} "
            f"| {_ratio(comp, t)} | {format_bytes(r.get('peak_mem_bytes'))} |"
        )
    return "\n".join(lines)


def model_table(records):
    lines = [
        "| model | mode | device | dtype | B x H x W | backend | time | images/s | vs reference | memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, ref, _ in _rows([r for r in records if not _is_op(r)]):
        s = r["shape"]
        t = r["time_s"]
        rate = f"{s['B'] / t:.1f}" if t else "-"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['device']} | {r['dtype']} | {s['B']}x{s['H']}x{s['W']} "
            f"| {r['backend']} | {'OOM' if r.get('oom') else format_time(t)} | {rate} | {_ratio(ref, t)} "
            f"| {format_bytes(r.get('peak_mem_bytes'))} |"
        )
    return "\n".join(lines)


def markdown(records):
    """The op table and the model table (whichever have records), with a note on the columns."""
    parts = []
    if any(_is_op(r) for r in records):
        parts += ["### Ops", op_table(records)]
    if any(not _is_op(r) for r in records):
        parts += ["### Models", model_table(records)]
    parts.append(
        "Time: median per call. vs reference / vs compile: that backend's time over this "
        "row's (above 1: faster). Memory: on a GPU the peak allocated during the call; on the "
        "CPU the bytes saved for backward (0 for inference)."
    )
    return "\n\n".join(parts)


def plot(records, path):
    """Writes a PNG of time and memory per image against resolution, one line per backend and one
    row per (model, mode, device, dtype). Returns ``(written, a line saying what was done)``."""
    series = {}
    for r in records:
        if not _is_op(r):
            key = (r["op"], r["mode"], r["device"], r["dtype"])
            series.setdefault(key, {}).setdefault(r["backend"], []).append(r)
    if not series:
        return False, "no model-level results (shape B, H, W): no plot"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False, "matplotlib is not installed (pip install matplotlib): plot skipped"

    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.6 * len(series)), squeeze=False)
    for (time_ax, mem_ax), (key, by_backend) in zip(axes, sorted(series.items())):
        for backend in sorted(by_backend, key=lambda b: _order(b, _backend_order())):
            runs = sorted(by_backend[backend], key=lambda r: r["shape"]["H"])
            done = [r for r in runs if not r.get("oom")]
            oom = [r["shape"]["H"] for r in runs if r.get("oom")]
            label = backend + (f" (OOM at {min(oom)})" if oom else "")
            xs = [r["shape"]["H"] for r in done]
            time_ax.plot(xs, [1e3 * r["time_s"] / r["shape"]["B"] for r in done], "o-", label=label)
            mem_ax.plot(xs, [(r.get("peak_mem_bytes") or 0) / 1e6 / r["shape"]["B"] for r in done], "o-", label=label)
        batches = sorted({r["shape"]["B"] for rs in by_backend.values() for r in rs})
        title = f"{key[0]} {key[1]}, {key[2]}, {key[3]}, B={'/'.join(map(str, batches))}"
        for ax, ylabel in ((time_ax, "ms per image"), (mem_ax, "MB per image")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("input resolution (pixels per side)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        # Attention's time grows quadratically: only a log axis keeps the others readable.
        time_ax.set_yscale("log")
        mem_ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, f"plot written to {path}"


def header(records, sources):
    devices = sorted({r["device"] for r in records})
    versions = sorted({tuple(sorted(r.get("versions", {}).items())) for r in records})
    lines = ["# glmix-kernels benchmark report", ""]
    lines += [f"- source {s}" for s in sources]
    lines += [f"- device: {', '.join(devices)}"]
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in vs) for vs in versions]
    return "\n".join(lines)


def main(paths, out=None):
    """Writes ``report.md`` and the plot into ``out`` (default: the first file's folder) and
    prints the report."""
    records, sources = load(paths)
    if not records:
        raise SystemExit(f"no glmix-kernels benchmarks in {', '.join(paths)}")
    out = out or os.path.dirname(os.path.abspath(paths[0]))
    os.makedirs(out, exist_ok=True)
    plot_path = os.path.join(out, PLOT_NAME)
    plotted, message = plot(records, plot_path)
    text = header(records, sources) + "\n\n" + markdown(records) + "\n"
    if plotted:
        text += f"\n![time and memory against resolution]({PLOT_NAME})\n"
    report_path = os.path.join(out, REPORT_NAME)
    with open(report_path, "w") as f:
        f.write(text)
    print(text)
    print(f"report written to {report_path}")
    print(message)
