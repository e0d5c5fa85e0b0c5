"""``dscovid_lung_mask -i IN -o OUT``: classical lung masks (dense lesions included), one ``<case>.nii.gz`` per scan."""

from __future__ import annotations

import argparse
import sys

from dscovid.cli._common import run_command
from dscovid.io.scans import find_scans
from dscovid.preprocessing.lung import LungMaskSettings, write_lung_masks


def _run(args: argparse.Namespace) -> int:
    scans = find_scans(args.input)
    settings = LungMaskSettings(closing_radius_mm=args.closing_radius_mm, chest_wall_gaps=args.chest_wall_gaps)
    failures = write_lung_masks(scans, args.output, settings, progress=not args.quiet)
    for case, reason in failures:
        print(f"{case}: {reason}", file=sys.stderr)
    written = len(scans) - len(failures)
    print(f"{written} of {len(scans)} lung mask(s) written to {args.output}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dscovid_lung_mask",
        description="Segment the lungs of chest CT scans without any trained model (dense lesions are kept inside "
        "the mask) and write one 0/1 mask per scan, <case>.nii.gz, on the scan's own grid.",
    )
    parser.add_argument("-i", "--input", required=True, metavar="IN",
                        help="a CT volume file, a DICOM series folder, or a folder of volumes and DICOM series")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder for <case>.nii.gz")
    parser.add_argument("--closing-radius-mm", type=float, default=LungMaskSettings.closing_radius_mm,
                        help="radius of the per-lung closing that brings pleural lesions into the mask "
                        "(default %(default)s mm)")
    parser.add_argument("--chest-wall-gaps", action="store_true",
                        help="also fill the tissue between each lung and its ribs behind and beside it: more of a "
                        "consolidation filling the back of a lung is kept (off by default, and off in the "
                        "preprocessor; see docs/lung_mask.md)")
    return run_command(parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
