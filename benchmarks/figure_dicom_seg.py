"""Draw ``docs/screenshots/dicom_seg.png``: a DICOM-SEG written by dscovid over its source series, read from the files.

::

    python benchmarks/figure_dicom_seg.py [-o docs/screenshots/dicom_seg.png]

A full-size synthetic COVID-19 chest CT (no trained model is needed: its reference lesion and lung masks stand for a
prediction) is written as a CT DICOM series; the SEG is written from the masks by the same function the predictor
uses (:func:`dscovid.io.dicom_seg.build_segmentation`). The picture is then drawn from the files only: the SEG read
back with highdicom (the frame of the source instance with most lesion, its segments' labels, codes and colours), the
CT slice that frame references read from its own DICOM file with SimpleITK.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dicom_export import write_ct_series  # noqa: E402 - the benchmark's series writer


def write_example(work: Path, seed: int, index: int, slices: int) -> tuple[Path, Path]:
    """The synthetic series (``slices`` slices around the most lesioned one) and its SEG."""
    from dataset_conversion.synthetic import generate_case
    from dscovid.io.dicom_content import ModelIdentity
    from dscovid.io.dicom_seg import build_segmentation, write_segmentation
    from dscovid.io.dicom_series import read_source_series
    from dscovid.io.image_io import Geometry, read_image

    case = generate_case(seed, index, full_size=True)
    centre = int(np.argmax(case.lesion.sum(axis=(1, 2))))
    start = int(np.clip(centre - slices // 2, 0, case.lesion.shape[0] - slices))
    part = slice(start, start + slices)
    origin = case.geometry.index_to_world_matrix() @ [start, 0, 0, 1]
    geometry = Geometry((slices, *case.geometry.shape_zyx[1:]), case.geometry.spacing_zyx_mm, tuple(origin[:3]),
                        case.geometry.direction)
    series = write_ct_series(case.image_hu[part].astype(np.int16), geometry, work / "series")
    _, read_geometry = read_image(series)
    source = read_source_series(series, read_geometry)
    model = ModelIdentity("reference masks", "synthetic", ("-",))
    segmentation = build_segmentation(source, case.lesion[part], case.lung[part], model)
    return series, write_segmentation(segmentation, work / "case_seg.dcm")


def draw(series: Path, seg_path: Path, output: Path) -> Path:
    """Draw the SEG frame with most lesion over the CT slice it references, from the files."""
    import highdicom as hd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pydicom
    import SimpleITK as sitk
    from matplotlib.colors import ListedColormap
    from PIL import Image

    seg = hd.seg.segread(seg_path)
    files = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path
             for path in sorted(series.glob("*.dcm"))}
    uids = list(files)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    k = int(np.argmax(pixels[..., 0].sum(axis=(1, 2))))
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(files[uids[k]])))[0]
    segments = {int(item.SegmentNumber): item for item in seg.SegmentSequence}

    figure, axes = plt.subplots(1, 2, figsize=(9, 4.9))
    for axis in axes:
        axis.imshow(ct, cmap="gray", vmin=-1350, vmax=150)
        axis.set_axis_off()
    axes[0].set_title(f"source CT, instance …{uids[k][-10:]}", fontsize=9)
    labels = []
    for number, alpha in ((2, 0.22), (1, 0.55)):
        item = segments[number]
        colour = np.asarray(hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()) / 255
        mask = pixels[k, :, :, number - 1].astype(bool)
        axes[1].imshow(np.where(mask, 1.0, np.nan), cmap=ListedColormap([colour]), alpha=alpha, vmin=0, vmax=1)
        axes[1].contour(mask, levels=[0.5], colors=[colour], linewidths=0.8)
        code = item.SegmentedPropertyTypeCodeSequence[0]
        labels.append(f"{item.SegmentLabel} (SCT {code.CodeValue})")
    axes[1].set_title(" + ".join(reversed(labels)) + " from the SEG", fontsize=9)
    figure.suptitle(f"{seg_path.name}: {seg.NumberOfFrames} frames over {len(uids)} source instances, "
                    f"frame of reference …{seg.FrameOfReferenceUID[-10:]}", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=80)
    plt.close(figure)
    output.parent.mkdir(parents=True, exist_ok=True)
    # 128 colours are plenty for a grey CT with two overlays and halve the file (docs stay small).
    Image.open(buffer).convert("RGB").quantize(colors=128).save(output, optimize=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="docs/screenshots/dicom_seg.png")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--index", type=int, default=1, help="a COVID-19 case of the synthetic dataset")
    parser.add_argument("--slices", type=int, default=40)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dscovid_figure_seg_"))
    try:
        series, seg_path = write_example(work, args.seed, args.index, args.slices)
        print(draw(series, seg_path, Path(args.output)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
