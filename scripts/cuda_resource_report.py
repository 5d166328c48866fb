"""Per-kernel resource report of built CUDA machine code, without a GPU.

    python3 scripts/cuda_resource_report.py --cuobjdump PATH --ptxas-log LOG [--json FILE] BINARY...

BINARY: shared libraries or cubins holding SASS (every architecture in them is reported). LOG:
the compilers' output with `-Xptxas -v` (spill stores and loads per kernel and architecture).
For each kernel and architecture: registers, spill bytes (stores + loads), stack frame, static
shared memory, threads per block from __launch_bounds__, the blocks per SM those allow (registers,
threads and static shared memory only: dynamic shared memory is chosen at launch), and the number
of tensor-core instructions (HMMA) in its SASS. Prints a table; writes the records as JSON.

Exits non-zero when a kernel spills, when a kernel named in TENSOR_CORE_KERNELS has no HMMA on
some architecture, or when a kernel has no ptxas record (so a parsing failure cannot pass).
"""

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict

# Kernels whose products must run on tensor cores (base names, without template arguments): the
# test kernels, and every kernel of the backends named *_mma (forward and backward).
TENSOR_CORE_KERNELS = {
    "mma_tile_test",
    "mma3_tile_test",
    "cluster_fwd_chunk_mma",
    "dispatch_fwd_mma",
    "pixel_bwd_mma",
    "slot_bwd_mma",
}


def needs_tensor_cores(kernel):
    base = kernel.split("<")[0].split("::")[-1]
    return base in TENSOR_CORE_KERNELS or base.endswith("_mma")


# Per-SM limits (registers, threads, blocks, shared memory per SM and reserved per block, bytes).
SM_LIMITS = {
    80: (65536, 2048, 32, 167936, 1024),
    86: (65536, 1536, 16, 102400, 1024),
    89: (65536, 1536, 24, 102400, 1024),
    90: (65536, 2048, 32, 233472, 1024),
}


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled):
    """'void glmix::ns::(anonymous namespace)::kern<c10::Half>(args)' -> 'kern<Half>'."""
    s = demangled.replace("(anonymous namespace)", "").split("(")[0].replace("void ", "", 1)
    base, _, targs = s.partition("<")
    base = base.split("::")[-1]
    if targs:
        targs = ",".join(a.strip().split("::")[-1] for a in targs.rstrip(">").split(","))
        return f"{base}<{targs}>"
    return base


def cuobjdump_sections(cuobjdump, binary, flag):
    """(arch, text) per ELF in the binary for one cuobjdump mode."""
    text = subprocess.run([cuobjdump, flag, binary], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^arch = sm_(\d+)\s*$", text, flags=re.M)
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]


def parse_binary(cuobjdump, binary, rec):
    for arch, text in cuobjdump_sections(cuobjdump, binary, "-res-usage"):
        for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text):
            r = rec[(m.group(1), arch)]
            r.update(
                registers=int(m.group(2)),
                stack_bytes=int(m.group(3)),
                shared_bytes=int(m.group(4)),
                local_bytes=int(m.group(5)),
            )
    for arch, text in cuobjdump_sections(cuobjdump, binary, "-sass"):
        for m in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", text, flags=re.S):
            rec[(m.group(1), arch)]["tensor_core_instructions"] = len(re.findall(r"\bHMMA\.", m.group(2)))
    for arch, text in cuobjdump_sections(cuobjdump, binary, "-elf"):
        for m in re.finditer(r"^\.nv\.info\.(\S+)\n(.*?)(?=^\.|\Z)", text, flags=re.S | re.M):
            t = re.search(
                r"EIATTR_MAX_THREADS\s*\n\s*Format:\s*\S+\s*\n\s*Value:\s*(0x[0-9a-f]+) (0x[0-9a-f]+) "
                r"(0x[0-9a-f]+)",
                m.group(2),
            )
            if t and (m.group(1), arch) in rec:
                rec[(m.group(1), arch)]["max_threads"] = int(t.group(1), 16) * int(t.group(2), 16) * int(t.group(3), 16)


def parse_ptxas_log(path):
    """{(mangled, arch): spill bytes} from `ptxas -v` output."""
    spills, arch, name = {}, None, None
    with open(path, errors="replace") as f:
        for line in f:
            m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)", line)
            if m:
                arch = int(m.group(2))
                continue
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                name = m.group(1)
                continue
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and name is not None and arch is not None:
                spills[(name, arch)] = int(m.group(1)) + int(m.group(2))
                name = None
    return spills


def blocks_per_sm(r, arch):
    """Resident blocks per SM allowed by registers, threads and static shared memory."""
    threads = r.get("max_threads")
    if not threads or arch not in SM_LIMITS:
        return None
    regs, max_threads, max_blocks, smem, reserved = SM_LIMITS[arch]
    warps = (threads + 31) // 32
    regs_per_warp = ((max(r["registers"], 1) * 32 + 255) // 256) * 256
    by_regs = (regs // regs_per_warp) // warps
    # sm_90's static figure already includes the block's reserved kilobyte.
    by_smem = smem // (r["shared_bytes"] + (reserved if arch < 90 else 0))
    return min(by_regs, max_threads // (warps * 32), max_blocks, by_smem)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--ptxas-log", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()

    rec = defaultdict(dict)
    for b in args.binaries:
        parse_binary(args.cuobjdump, b, rec)
    spills = parse_ptxas_log(args.ptxas_log)
    names = demangle(sorted({n for n, _ in rec}))
    records, errors = [], []
    for (mangled, arch), r in sorted(rec.items(), key=lambda kv: (short_name(names[kv[0][0]]), kv[0][1])):
        kernel = short_name(names[mangled])
        if "registers" not in r:
            continue  # SASS of a function that is not a kernel
        out = dict(
            kernel=kernel,
            arch=f"sm_{arch}",
            registers=r["registers"],
            spill_bytes=spills.get((mangled, arch)),
            shared_bytes=r["shared_bytes"],
            tensor_core_instructions=r.get("tensor_core_instructions", 0),
            stack_bytes=r["stack_bytes"],
            max_threads=r.get("max_threads"),
            blocks_per_sm=blocks_per_sm(r, arch),
        )
        records.append(out)
        if out["spill_bytes"] is None:
            errors.append(f"{kernel} sm_{arch}: no ptxas -v record in {args.ptxas_log}")
        elif out["spill_bytes"] > 0:
            errors.append(f"{kernel} sm_{arch}: spills {out['spill_bytes']} bytes")
        if needs_tensor_cores(kernel) and out["tensor_core_instructions"] == 0:
            errors.append(f"{kernel} sm_{arch}: no tensor-core (HMMA) instruction")
    if not records:
        errors.append("no kernels found in " + " ".join(args.binaries))

    cols = [
        "kernel",
        "arch",
        "registers",
        "spill_bytes",
        "stack_bytes",
        "shared_bytes",
        "max_threads",
        "blocks_per_sm",
        "tensor_core_instructions",
    ]
    heads = ["kernel", "arch", "regs", "spill", "stack", "static smem", "threads", "blocks/SM", "HMMA"]
    width = [max(len(h), *(len(str(r[c])) for r in records)) for h, c in zip(heads, cols)] if records else []
    print("  ".join(h.ljust(w) for h, w in zip(heads, width)))
    for r in records:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, width)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    for e in errors:
        print(f"cuda_resource_report: FAILED: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
