"""``dscovid_demo``: generate the synthetic dataset, train fold 0 on the CPU, predict and evaluate a test set, and
write an HTML report (docs/demo.md). A second run reuses every stage that is already complete."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dscovid.cli._common import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_demo",
        description="Run the whole pipeline on synthetic chest CTs (about 20 minutes on two idle CPU cores): generate "
        "training and test cases, plan and preprocess (3d_cpu), train fold 0, predict and evaluate the test set, "
        "and write DIR/report/report.html. Stages already complete are reused.",
    )
    parser.add_argument("-o", "--output", default="dscovid_demo", metavar="DIR",
                        help="demo folder (default: ./dscovid_demo)")
    parser.add_argument("--cases", type=int, default=60, metavar="N", help="training cases (default 60)")
    parser.add_argument("--test-cases", type=int, default=30, metavar="M", help="test cases (default 30)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, metavar="F",
                        help="multiply the training epochs of the 3d_cpu configuration (default 1)")
    parser.add_argument("--scale", type=float, default=1.0, metavar="S",
                        help="voxel-count scale of the synthetic cases (e.g. 0.4: tiny cases, a quick look)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="training and prediction device (default: cpu)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, metavar="N",
                        help="worker processes for generation, preprocessing and evaluation (default 2)")
    return parser


def _body(args: argparse.Namespace) -> int:
    from dscovid.demo.pipeline import run_demo

    result = run_demo(args.output, args.cases, args.test_cases, args.epochs_scale, args.num_processes,
                      scale=args.scale, device=args.device, progress=not args.quiet)
    print(result.report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
