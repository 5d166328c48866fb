"""python -m glmix_kernels.bench [quick]: the main job (glmix_kernels/bench/quick.py).
python -m glmix_kernels.bench report RESULTS.json [...] [--out DIR]: the report (report.py)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m glmix_kernels.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    quick = commands.add_parser("quick", help="check glnet_4g and compare the ops on this machine (the default)")
    quick.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rep = commands.add_parser("report", help="markdown table and plot from pytest-benchmark JSON files")
    rep.add_argument("results", nargs="+", help="files written by pytest benchmarks/ --benchmark-json=...")
    rep.add_argument("--out", help="folder for report.md and the plot (default: the first file's folder)")
    args = parser.parse_args(argv)

    if args.command == "report":
        from . import report

        report.main(args.results, args.out)
        return 0
    from . import quick as job

    return job.main(getattr(args, "device", None))


if __name__ == "__main__":
    sys.exit(main())
