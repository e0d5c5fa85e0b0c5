"""Does test-time augmentation of the classifier alone help? Accuracy of a trained model with its class probabilities
averaged over spatial transforms of the classification grid.

The predictor averages each fold's class probabilities over the plain and the left-right mirrored scan, and the
mirrored pass costs a whole sliding window. The classifier itself runs on the small classification grid, so more
views of it are almost free: this script segments each case once per mirror as the predictor does
(``dscovid.inference.engine.segment_scan``), then runs the classifier on the grid (the classification image and
the lesion map on it, transformed together about the grid's centre with the training augmentation's own
``resample_grid``: in-plane rotations and zooms of the ranges training draws) and reports the accuracy of every
set of views against the predictor's (identity and mirror), with 95 % Wilson intervals and the paired difference
(bootstrap over the cases). For a network with the findings head it also scores each of the two terms that add up
to the class logits on their own (the classification subnet's, equation 4, and the findings head's). Only for
networks without the cross-stitch (``3d_cpu``): with it, the stitched segmentation features would have to be
transformed too.

    python benchmarks/classifier_tta.py --model RESULTS/Dataset980_AccuracyTrain/DeepSCCOVIDTrainer__3d_cpu \\
        --dataset RAW/Dataset981_AccuracyDev --json tta.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscovid.evaluation.intervals import paired_bootstrap, wilson_interval  # noqa: E402
from dscovid.inference.engine import segment_scan, tile_batch_size  # noqa: E402
from dscovid.inference.model_loading import load_trained_model  # noqa: E402
from dscovid.io.dataset import load_raw_dataset  # noqa: E402
from dscovid.io.scans import Scan  # noqa: E402
from dscovid.model.precision import autocast  # noqa: E402
from dscovid.prediction.inputs import load_case  # noqa: E402
from dscovid.preprocessing.resampling import resample_to_grid  # noqa: E402
from dscovid.training.augmentation import resample_grid, spatial_matrix  # noqa: E402

#: (in-plane rotation in degrees, zoom) of each extra view; training draws up to 15 degrees and 0.85-1.15.
VIEWS = {"identity": (0.0, 1.0), "rot-10": (-10.0, 1.0), "rot+10": (10.0, 1.0), "zoom0.9": (0.0, 0.9),
         "zoom1.1": (0.0, 1.1)}
VIEW_SETS = {"predictor (identity)": ["identity"], "+ rotations": ["identity", "rot-10", "rot+10"],
             "+ zooms": ["identity", "zoom0.9", "zoom1.1"], "all five": list(VIEWS),
             "identity, the classification subnet's logits alone": ["identity/subnet"],
             "identity, the findings head's logits alone": ["identity/findings"]}


def case_probabilities(model, loaded, spacing_zyx_mm) -> dict[str, np.ndarray]:
    """Class probabilities of each view, averaged over the folds and the mirrors as the predictor does."""
    device = model.device
    settings = model.inference
    shape = loaded.image.shape
    total: dict[str, np.ndarray] = {}
    flips = [()] + [(int(axis),) for axis in settings.mirror_axes]
    for flip in flips:
        image = np.ascontiguousarray(np.flip(loaded.image, flip) if flip else loaded.image, dtype=np.float32)
        cls_image = np.ascontiguousarray(np.flip(loaded.cls_image, flip) if flip else loaded.cls_image)
        region = np.ascontiguousarray(np.flip(loaded.region_preprocessed, flip) if flip
                                      else loaded.region_preprocessed) != 0
        for network in model.networks:
            if getattr(network, "uses_cross_stitch", False):
                raise SystemExit(f"{model.model_dir}: the cross-stitch's stitched features are not transformed here")
            scan = segment_scan(network, torch.from_numpy(image)[None], region,
                                torch.from_numpy(cls_image)[None, None].to(device), model.patch_size_zyx,
                                settings.step_fraction, settings.weighting,
                                tile_batch_size(model.network_configuration, device), device, torch.device("cpu"),
                                placement=settings.tile_placement)
            lesion = resample_to_grid(scan.probability.numpy(), cls_image.shape)
            for name, (angle, zoom) in VIEWS.items():
                if name == "identity":
                    cls_view, lesion_view = cls_image, lesion
                else:
                    matrix = spatial_matrix(np.deg2rad(angle), zoom, spacing_zyx_mm)
                    centre = np.zeros(3)
                    cls_view = resample_grid(cls_image, shape, centre, shape, matrix)
                    lesion_view = resample_grid(lesion, shape, centre, shape, matrix)
                cls_t = torch.from_numpy(np.ascontiguousarray(cls_view, dtype=np.float32))[None, None].to(device)
                lesion_t = torch.from_numpy(np.ascontiguousarray(lesion_view, dtype=np.float32))[None, None].to(device)
                with torch.no_grad(), autocast(device):
                    i_cls = network.encode_classification(cls_t)
                    subnet, _, term = network.classify_parts(i_cls, lesion_t, None, None, cls_t)
                parts = {name: subnet if term is None else subnet + term}
                if name == "identity" and term is not None:  # what each of the two terms says on its own
                    parts.update({"identity/subnet": subnet, "identity/findings": term})
                for key, logits in parts.items():
                    total[key] = total.get(key, 0.0) + torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the <Trainer>__<configuration> folder")
    parser.add_argument("--folds", nargs="+", default=["0"])
    parser.add_argument("--dataset", type=Path, required=True, help="a raw dataset with its classes")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases (a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_trained_model(args.model, folds=args.folds, device="cpu")
    dataset = load_raw_dataset(args.dataset)
    cases = list(dataset.cases())[: args.limit]
    labels, views = [], {}
    started = time.perf_counter()
    for case in cases:
        loaded = load_case(Scan(case.name, Path(case.image)), model.preprocessing)
        spacing = np.asarray(loaded.properties["target_spacing_zyx_mm"], dtype=np.float64)
        for name, probabilities in case_probabilities(model, loaded, spacing).items():
            views.setdefault(name, []).append(probabilities)
        labels.append(model.class_names.index(case.class_name))
    y = np.array(labels)
    print(f"{len(y)} cases in {time.perf_counter() - started:.0f} s")
    reference = None
    result = {"model": str(args.model), "folds": args.folds, "dataset": str(args.dataset), "cases": len(y), "rows": []}
    print("| classifier views (each also mirrored) | accuracy (95 % CI) | minus the predictor's (95 % CI) |")
    print("|---|---|---|")
    for set_name, names in VIEW_SETS.items():
        if any(name not in views for name in names):  # a network without the findings head has no parts
            continue
        guessed = np.argmax(sum(np.array(views[name]) for name in names), axis=1)
        correct = (guessed == y).astype(float)
        reference = correct if reference is None else reference
        low, high = wilson_interval(int(correct.sum()), len(y))
        diff = paired_bootstrap(correct, reference) if set_name != "predictor (identity)" else None
        result["rows"].append({"views": set_name, "accuracy": float(correct.mean()), "interval": [low, high],
                               "paired": diff})
        shown = "–" if diff is None else f"{100 * diff[0]:+.1f} ({100 * diff[1]:+.1f} to {100 * diff[2]:+.1f})"
        print(f"| {set_name} | {100 * correct.mean():.1f} ({100 * low:.1f}-{100 * high:.1f}) | {shown} |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
