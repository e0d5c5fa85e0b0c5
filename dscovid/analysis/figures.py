"""The figures of the paper's Fig. 1 (d-i), drawn from the summary written by :func:`analyze_dataset`.

Each panel is a function ``panel_<letter>(ax, summary)`` so that it can be drawn alone (``fig1_<letter>_*.png``) or
in the combined ``fig1_findings.png``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dscovid.evaluation.plots import save_figure

_COLOURS = {"covid": "tab:red", "cap": "tab:blue", "non_pneumonia": "tab:gray"}
_LABELS = {"covid": "COVID-19", "cap": "CAP", "non_pneumonia": "non-pneumonia"}


def _colour(name: str, index: int) -> str:
    return _COLOURS.get(name, f"C{index + 3}")


def _label(name: str, summary_class: dict) -> str:
    return f"{_LABELS.get(name, name)} (n={summary_class['num_cases']})"


def _pneumonia_classes(summary: dict) -> list[str]:
    """The classes that have lesions (non-pneumonia cases only add zeros to lesion plots)."""
    return [name for name, data in summary["classes"].items() if data["num_cases_with_lesion"] > 0]


def panel_d(ax, summary: dict) -> None:
    """(d) Lesions per CT: share of the cases of each class with 1, 2, ... lesions (last bin open)."""
    names = _pneumonia_classes(summary)
    counts = {n: [c for c in summary["classes"][n]["lesion_count"]["values"] if c > 0] for n in names}
    top = max([max(v, default=1) for v in counts.values()] + [1])
    last = int(min(max(top, 5), 20))
    bins = np.arange(1, last + 1)
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        values = np.minimum(np.array(counts[name]), last)
        share = np.array([np.mean(values == b) if values.size else 0.0 for b in bins])
        ax.bar(bins + (index - (len(names) - 1) / 2) * width, 100 * share, width=width, color=_colour(name, index),
               label=_label(name, summary["classes"][name]))
    ax.set_xticks(bins, [str(b) if b < last else f"≥{last}" for b in bins])
    ax.set(xlabel="lesions per CT", ylabel="% of CTs", title="(d) lesion count")
    ax.legend()


def panel_e(ax, summary: dict) -> None:
    """(e) Bounding-box size of every lesion: width (x) against height (z), length (y) as marker size."""
    for index, name in enumerate(_pneumonia_classes(summary)):
        sizes = np.array(summary["classes"][name]["lesion_bbox_size_zyx_mm"], dtype=float).reshape(-1, 3)
        if sizes.size:
            ax.scatter(sizes[:, 2], sizes[:, 0], s=4 + sizes[:, 1] / 5, alpha=0.4, color=_colour(name, index),
                       label=f"{_LABELS.get(name, name)} ({len(sizes)} lesions)")
    ax.set(xlabel="width (x) mm", ylabel="height (z) mm", title="(e) lesion size (marker: length y)")
    ax.legend()


def panel_f(ax, summary: dict) -> None:
    """(f) Distribution of the lesion CT values, all lesion voxels of a class pooled."""
    edges = np.asarray(summary["hu_bin_edges"], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    for index, name in enumerate(_pneumonia_classes(summary)):
        hu = summary["classes"][name]["hu"]
        if hu["density"]:
            low = hu["window_fractions"].get("ggo_-960_-600")
            text = f" ({100 * low:.0f}% in [-960,-600])" if low is not None else ""
            ax.plot(centres, 100 * np.asarray(hu["density"]), color=_colour(name, index),
                    label=_LABELS.get(name, name) + text)
    ax.axvspan(-960, -600, color="0.9", zorder=0)
    ax.axvspan(-70, 140, color="0.95", zorder=0)
    ax.set(xlabel="CT value (HU)", ylabel=f"% of lesion voxels per {edges[1] - edges[0]:g} HU",
           title="(f) lesion density", xlim=(edges[0], edges[-1]))
    ax.legend()


def panel_g(ax, summary: dict) -> None:
    """(g) Lesion volume ratio per CT: share of cases in 2 % wide bins, mean LVR in the legend."""
    names = _pneumonia_classes(summary)
    bins = np.arange(0, 42, 2.0)
    width = 2.0 / max(len(names) + 0.5, 1)
    for index, name in enumerate(names):
        data = summary["classes"][name]["lesion_volume_ratio"]
        values = 100 * np.asarray(data["values"], dtype=float)
        counts = np.histogram(np.clip(values, 0, bins[-1] - 1e-9), bins=bins)[0]
        share = 100 * counts / max(values.size, 1)
        ax.bar(bins[:-1] + width * (index + 0.5), share, width=width, color=_colour(name, index),
               label=f"{_LABELS.get(name, name)}: mean {100 * (data['mean'] or 0):.1f}%")
    ax.set(xlabel="lesion volume ratio (%) (last bin open)", ylabel="% of CTs", title="(g) lesion volume ratio")
    ax.legend()


def panel_h(ax, summary: dict) -> None:
    """(h) Spread of the lesion centres (mm) per LVR group, mean and standard deviation over the cases."""
    names = _pneumonia_classes(summary)
    edges = summary["lvr_group_edges"]
    labels = [f"{100 * lo:.0f}-{100 * hi:.0f}" if hi is not None else f">{100 * lo:.0f}"
              for lo, hi in zip(edges[:-1], edges[1:])]
    positions = np.arange(len(labels))
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        groups = summary["classes"][name]["spread_by_lvr_group"]
        means = [g["spread_mm"]["mean"] if g["spread_mm"]["mean"] is not None else np.nan for g in groups]
        stds = [g["spread_mm"]["std"] if g["spread_mm"]["std"] is not None else np.nan for g in groups]
        # The lower error bar stops at 0: a spread is never negative.
        errors = [np.minimum(means, stds), stds]
        ax.bar(positions + (index - (len(names) - 1) / 2) * width, means, yerr=errors, width=width,
               color=_colour(name, index), capsize=2, label=_LABELS.get(name, name))
    ax.set_xticks(positions, labels)
    ax.set(xlabel="lesion volume ratio group (%)", ylabel="spread of lesion centres (mm)",
           title="(h) lesion distribution")
    ax.legend()


def panel_i(ax, summary: dict) -> None:
    """(i) Mean peripheral lesion ratio against the peripheral thickness σ."""
    thickness = np.asarray(summary["plr_thickness_mm"], dtype=float)
    for index, name in enumerate(_pneumonia_classes(summary)):
        plr = summary["classes"][name]["plr"]
        if plr["mean"]:
            mean = 100 * np.array([np.nan if v is None else v for v in plr["mean"]], dtype=float)
            std = 100 * np.array([np.nan if v is None else v for v in plr["std"]], dtype=float)
            ax.plot(thickness, mean, color=_colour(name, index), label=f"{_LABELS.get(name, name)} (n={plr['n']})")
            ax.fill_between(thickness, mean - std, mean + std, color=_colour(name, index), alpha=0.15)
    ax.set(xlabel="peripheral thickness σ (mm)", ylabel="peripheral lesion ratio (%)", ylim=(0, 100),
           title="(i) peripheral lesion ratio")
    ax.legend()


PANELS: dict[str, tuple[str, Callable]] = {
    "d": ("lesion_count", panel_d),
    "e": ("lesion_size", panel_e),
    "f": ("hu_distribution", panel_f),
    "g": ("lesion_volume_ratio", panel_g),
    "h": ("spread_by_lvr", panel_h),
    "i": ("peripheral_lesion_ratio", panel_i),
}


def draw_findings_figures(summary: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write ``fig1_<letter>_<name>.png`` for each panel and ``fig1_findings.png`` with all of them."""
    output_dir = Path(output_dir)
    written = []
    for letter, (name, draw) in PANELS.items():
        figure = Figure(figsize=(5.5, 4.2))
        draw(figure.subplots(), summary)
        written.append(save_figure(figure, output_dir / f"fig1_{letter}_{name}.png"))
    figure = Figure(figsize=(16.5, 8.4))
    axes = figure.subplots(2, 3).ravel()
    for ax, (_, draw) in zip(axes, PANELS.values()):
        draw(ax, summary)
    figure.suptitle(f"{summary['dataset']}: the four findings (paper Fig. 1 d-i), {summary['num_cases']} CTs")
    figure.tight_layout()
    written.append(save_figure(figure, output_dir / "fig1_findings.png"))
    return written
