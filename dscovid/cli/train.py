"""``dscovid_train FOLD``: train one fold of the 10-fold cross-validation (docs/training.md).

Also runs under ``torchrun --nproc_per_node=K -m dscovid.cli.train FOLD ...`` (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command


def build_parser() -> argparse.ArgumentParser:
    from dscovid.training.trainers import DEFAULT_TRAINER, TRAINERS

    parser = argparse.ArgumentParser(
        prog="dscovid_train",
        description="Train one fold (0-9, or 'all') of a preprocessed dataset: two-stage DeepSC-COVID training by "
        "default; results in $DSCOVID_results/DatasetNNN_Name/<Trainer>__<configuration>/fold_K/.",
    )
    parser.add_argument("fold", help="fold index (0-9) or 'all' (train on every case)")
    parser.add_argument("-d", "--dataset", default=None,
                        help="DatasetNNN_Name or its number (may be left out when one dataset is preprocessed)")
    parser.add_argument("-c", "--configuration", default="3d_cpu", help="plans configuration (default: 3d_cpu)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER,
                        help=f"trainer (default {DEFAULT_TRAINER}; known: {', '.join(TRAINERS)})")
    parser.add_argument("--continue", dest="continue_training", action="store_true",
                        help="resume from checkpoint_latest.pt (after any interruption)")
    parser.add_argument("--val-only", action="store_true", help="only run the final validation of a trained fold")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="training device (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the plans' training.seed)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels (with --seed: identical weights run to run; slower on GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="override every stage's epochs (tests, demos)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="override every stage's iterations per epoch (tests, demos)")
    parser.add_argument("--workers", type=int, default=None,
                        help="background data-loading processes (default: 1 on the CPU; on a GPU all cores but two, "
                        "at most 12; 0: none)")
    parser.add_argument("--no-validation", action="store_true", help="skip the final validation on the held-out cases")
    add_root_arguments(parser, "raw", "preprocessed", "results")
    return parser


def _body(args: argparse.Namespace) -> int:
    import torch

    from dscovid.training.run import run_training

    workers = args.workers
    if workers is None:
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        # The paper configuration on an H100 needs about 8 workers to keep up (benchmarks/bench_dataloader.py).
        workers = max(1, min(12, (os.cpu_count() or 1) - 2)) if on_gpu else 1
    result = run_training(
        roots_from_args(args), args.dataset, args.configuration, args.fold, args.trainer,
        continue_training=args.continue_training, validation_only=args.val_only, device=args.device,
        seed=args.seed, deterministic=args.deterministic, epochs=args.epochs, iterations_per_epoch=args.iterations,
        num_workers=workers, run_final_validation=not args.no_validation,
    )
    logging.getLogger("dscovid").info("Results in %s", result.fold_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
