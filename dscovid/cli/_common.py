"""What every command shares: the root flags, ``--debug``, and turning errors into one line and an exit status."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from dscovid.errors import DscovidError
from dscovid.io.atomic import describe_os_error
from dscovid.roots import Roots

log = logging.getLogger("dscovid")


def add_root_arguments(parser: argparse.ArgumentParser, *which: str) -> None:
    """Add ``--raw``, ``--preprocessed`` and/or ``--results`` (each defaulting to its DSCOVID_* variable)."""
    helps = {
        "raw": "raw datasets folder (default: $DSCOVID_raw)",
        "preprocessed": "preprocessed cache folder (default: $DSCOVID_preprocessed)",
        "results": "trained models folder (default: $DSCOVID_results)",
    }
    for name in which or ("raw", "preprocessed", "results"):
        parser.add_argument(f"--{name}", default=None, metavar="DIR", help=helps[name])


def roots_from_args(args: argparse.Namespace) -> Roots:
    return Roots.resolve(
        raw=getattr(args, "raw", None),
        preprocessed=getattr(args, "preprocessed", None),
        results=getattr(args, "results", None),
    )


def run_command(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``body`` and map a :class:`DscovidError` to one line on stderr and exit status 1.

    ``--debug`` shows the traceback instead and turns on debug logging.
    """
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings and errors")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    try:
        with logging_redirect_tqdm():  # a log line never lands inside a progress bar on a terminal
            status = body(args)
    except DscovidError as error:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the file system's refusals that no stage turned into its own message
        if args.debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"{parser.prog}: error: {where}{describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
