"""How closely the synthetic phantoms reproduce the paper's four lesion findings (section III-B, Fig. 1).

The measurements are those of :mod:`dscovid.measurements.findings` applied to generated cases, the same functions the
project uses on real data; :data:`PAPER` holds the paper's numbers.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np

from dataset_conversion.synthetic import PLR_THICKNESS_MM, generate_case
from dscovid.measurements import findings

#: The paper's values (section III-B): lesion counts, lesion volume ratios, HU windows, peripheral lesion ratios.
PAPER: dict[str, float] = {
    "covid_lesion_count": 4.4,
    "covid_share_4_or_more": 0.552,
    "cap_lesion_count": 1.7,
    "cap_share_exactly_1": 0.548,
    "covid_lvr_mean": 0.143,
    "covid_share_lvr_above_12": 0.5,
    "cap_lvr_mean": 0.044,
    "cap_share_lvr_above_12": 0.05,
    "covid_share_hu_-960_-600": 0.70,
    "cap_share_hu_bimodal": 0.75,
    "covid_plr": 0.624,
    "cap_plr": 0.245,
}


def measure_case(seed: int, index: int, scale: float = 1.0, thickness_mm: float = PLR_THICKNESS_MM,
                 variant: str | None = None) -> dict:
    """Generate one case (of ``variant``, default: the default generator) and measure it: class, lesion count, LVR,
    PLR at ``thickness_mm``, lesion HU shares."""
    image, lesion, lung, geometry, class_name, _ = generate_case(seed, index, scale=scale, variant=variant)
    hu = findings.lesion_hu_statistics(image, lesion)
    return {
        "class": class_name,
        "lesion_count": findings.lesion_count(lesion),
        "lvr": findings.lesion_volume_ratio(lesion, lung),
        "plr": findings.peripheral_lesion_ratio(lesion, lung, geometry.spacing_zyx_mm, thickness_mm),
        "lesion_voxels": hu["voxels"],
        "share_ggo": hu["fraction_ggo_-960_-600"],
        "share_bimodal": hu["fraction_low_-970_-580"] + hu["fraction_consolidation_-70_140"],
    }


def _measure(args: tuple[int, int, float, str | None]) -> dict:
    seed, index, scale, variant = args
    return measure_case(seed, index, scale, variant=variant)


def summarize(cases: list[dict]) -> dict[str, float]:
    """The paper's statistics over measured cases (keys as in :data:`PAPER`, plus the number of cases per class).

    HU shares pool the lesion voxels of all scans of a class (the paper's distribution curves are pooled).
    """
    def of(class_name: str, key: str) -> np.ndarray:
        return np.array([c[key] for c in cases if c["class"] == class_name], dtype=float)

    def pooled(class_name: str, key: str) -> float:
        voxels = of(class_name, "lesion_voxels")
        return float(np.nansum(of(class_name, key) * voxels) / voxels.sum()) if voxels.sum() else float("nan")

    covid_count, cap_count = of("covid", "lesion_count"), of("cap", "lesion_count")
    covid_lvr, cap_lvr = of("covid", "lvr"), of("cap", "lvr")
    return {
        "covid_lesion_count": float(covid_count.mean()),
        "covid_share_4_or_more": float(np.mean(covid_count >= 4)),
        "cap_lesion_count": float(cap_count.mean()),
        "cap_share_exactly_1": float(np.mean(cap_count == 1)),
        "covid_lvr_mean": float(covid_lvr.mean()),
        "covid_share_lvr_above_12": float(np.mean(covid_lvr > 0.12)),
        "cap_lvr_mean": float(cap_lvr.mean()),
        "cap_share_lvr_above_12": float(np.mean(cap_lvr > 0.12)),
        "covid_share_hu_-960_-600": pooled("covid", "share_ggo"),
        "cap_share_hu_bimodal": pooled("cap", "share_bimodal"),
        "covid_plr": float(np.nanmean(of("covid", "plr"))),
        "cap_plr": float(np.nanmean(of("cap", "plr"))),
        "non_pneumonia_lesion_count": float(of("non_pneumonia", "lesion_count").sum()),
        "cases_covid": float(covid_count.size),
        "cases_cap": float(cap_count.size),
        "cases_non_pneumonia": float(of("non_pneumonia", "lesion_count").size),
    }


def measure_cases(n_cases: int, seed: int, scale: float = 1.0, num_processes: int = 1,
                  first_index: int = 0, variant: str | None = None) -> list[dict]:
    """Generate ``n_cases`` cases (in memory, not written) and measure each (see :func:`measure_case`)."""
    jobs = [(seed, index, scale, variant) for index in range(first_index, first_index + n_cases)]
    if num_processes > 1:
        with ProcessPoolExecutor(max_workers=num_processes) as pool:
            return list(pool.map(_measure, jobs, chunksize=4))
    return [_measure(job) for job in jobs]


def measure_findings(n_cases: int, seed: int, scale: float = 1.0, num_processes: int = 1,
                     first_index: int = 0, variant: str | None = None) -> dict[str, float]:
    """Generate and measure ``n_cases`` cases and summarise their findings (see :func:`summarize`)."""
    return summarize(measure_cases(n_cases, seed, scale, num_processes, first_index, variant))
