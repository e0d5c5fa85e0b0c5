"""``dscovid_convert DATASET -i SOURCE -o DatasetNNN_Name``: turn a public COVID chest-CT dataset into a raw dataset.

Cases that cannot be converted are listed with the reason; the exit status is non-zero only when
nothing could be converted or the input is wrong. See docs/datasets.md for the datasets and options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataset_conversion.common import ConversionReport
from dataset_conversion.convert_3dlsc import convert_3dlsc
from dataset_conversion.convert_cc_ccii import DEFAULT_FOV_MM, DEFAULT_Z_EXTENT_MM, INTENSITY_MODES, convert_cc_ccii
from dataset_conversion.convert_covid19_20 import convert_covid19_20
from dataset_conversion.convert_covid19_ct_seg import convert_covid19_ct_seg
from dataset_conversion.convert_covid_ct_md import convert_covid_ct_md
from dataset_conversion.convert_mosmed import convert_mosmed
from dscovid.cli._common import run_command
from dscovid.errors import DscovidError

DATASETS = {
    "3dlsc": "3DLSC-COVID (covid/cap/normal NIfTI, lesion masks checked against their CT)",
    "covid_ct_md": "COVID-CT-MD (DICOM, three classes, slice-level infection labels)",
    "mosmed": "MosMedData COVID19_1110 (CT-0 normal, CT-1..4 covid with severity)",
    "covid19_20": "COVID-19-20 challenge (covid, lesion masks)",
    "covid19_ct_seg": "COVID-19-CT-Seg, Ma et al. (covid, lesion and lung masks)",
    "cc_ccii": "CC-CCII (NCP/CP/Normal 8-bit slices, stacked; not HU)",
}


def _convert(args: argparse.Namespace) -> ConversionReport:
    common = {"source": Path(args.input), "out_dir": Path(args.output), "num_processes": max(1, args.np),
              "progress": not args.quiet}
    if args.dataset == "3dlsc":
        return convert_3dlsc(**common, fix_orientation=args.fix_orientation, use_lung_masks=not args.no_lung_masks)
    if args.dataset == "covid_ct_md":
        return convert_covid_ct_md(**common)
    if args.dataset == "mosmed":
        return convert_mosmed(**common)
    if args.dataset == "covid19_20":
        return convert_covid19_20(**common)
    if args.dataset == "covid19_ct_seg":
        return convert_covid19_ct_seg(**common, keep_not_hu=args.keep_not_hu)
    if args.dataset == "cc_ccii":
        return convert_cc_ccii(**common, intensity=args.intensity, fov_mm=args.fov_mm, z_extent_mm=args.z_extent_mm,
                               spacing_zyx_mm=tuple(args.spacing) if args.spacing else None)
    raise DscovidError(f"unknown dataset {args.dataset!r}")


def _run(args: argparse.Namespace) -> int:
    report = _convert(args)
    for line in report.summary_lines():
        print(line)
    if not report.converted:
        print(f"{args.output}: no case could be converted", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_convert",
        description="Convert a public COVID chest-CT dataset into a dscovid raw dataset (imagesTr/, labelsTr/, "
                    "dataset.json with the class and lesion annotation of each case). Re-running updates only what changed.",
        epilog="Example: dscovid_convert mosmed -i MosMedData -o $DSCOVID_raw/Dataset102_MosMed -np 4",
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, help_text in DATASETS.items():
        dataset = sub.add_parser(name, help=help_text, description=help_text)
        dataset.add_argument("-i", "--input", required=True, metavar="SOURCE", help="the downloaded dataset folder")
        dataset.add_argument("-o", "--output", required=True, metavar="DATASET_DIR",
                             help="raw dataset folder to write, named DatasetNNN_Name (e.g. $DSCOVID_raw/Dataset101_Name)")
        dataset.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
        # Also accepted after the dataset name; SUPPRESS keeps a flag given before it.
        dataset.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        dataset.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == "3dlsc":
            dataset.add_argument("--fix-orientation", action="store_true",
                                 help="where a mask does not fit its CT as stored, apply the one axis flip/rotation/reordering "
                                      "that fits unambiguously better (recorded in the case metadata) instead of skipping")
            dataset.add_argument("--no-lung-masks", action="store_true", help="ignore lung-npy/<id>.npy lung masks")
        if name == "covid19_ct_seg":
            dataset.add_argument("--keep-not-hu", action="store_true",
                                 help="keep CTs that are not in HU (the Radiopaedia cases, 0-255) and mark the dataset not_HU")
        if name == "cc_ccii":
            dataset.add_argument("--intensity", choices=INTENSITY_MODES, default="lung_window",
                                 help="lung_window: grey 0..255 → -1350..150 HU-like (W1500 L-600, default); raw: keep 0..255")
            dataset.add_argument("--fov-mm", type=float, default=DEFAULT_FOV_MM,
                                 help=f"assumed in-plane field of view in mm (default {DEFAULT_FOV_MM:g})")
            dataset.add_argument("--z-extent-mm", type=float, default=DEFAULT_Z_EXTENT_MM,
                                 help=f"assumed z extent of a scan in mm: z spacing = extent / slices "
                                      f"(default {DEFAULT_Z_EXTENT_MM:g})")
            dataset.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                                 help="fixed spacing in mm instead of the two assumptions above")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
