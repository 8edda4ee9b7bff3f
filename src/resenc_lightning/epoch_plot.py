"""`epoch_times.png`: the picture of what this project is for, epoch times that stay where the fresh run put them.

nnU-Net's `progress.png` has an epoch-duration panel, but it cannot show where a run was resumed or what the fresh
run's reference was; `EpochTiming` knows both, so it draws this next to `progress.png` every epoch. Drawn with
matplotlib's object API on an Agg canvas (no pyplot: no global backend switch, no GUI, safe in any thread), and
written atomically so a kill never leaves half a PNG.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from resenc_lightning.atomic import atomic_write

FILE_NAME = "epoch_times.png"
_BAND = "#2ca02c"
_RESUME = "#7f7f7f"
_DRIFT = "#d62728"


def draw(epochs: list[dict[str, float]], reference: dict[str, float] | None, tolerance: float,
         resumes: list[int], drifts: list[dict[str, Any]], reference_resumed: bool = False) -> Any:
    """The figure: epoch wall time, median step time (what drift is judged on) and data-wait share per epoch, the
    reference band, one dashed line per resume and each drift warning with its named cause. Drawn in matplotlib's
    default style: nnunetv2's progress.png sets seaborn's global style (font scale 2.5) in the same process."""
    import matplotlib

    with matplotlib.style.context("default"):
        return _draw(epochs, reference, tolerance, resumes, drifts, reference_resumed)


def _draw(epochs: list[dict[str, float]], reference: dict[str, float] | None, tolerance: float,
          resumes: list[int], drifts: list[dict[str, Any]], reference_resumed: bool) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_epoch, ax_step, ax_wait = fig.subplots(3, 1, sharex=True)
    x = [int(e["epoch"]) for e in epochs]
    style = "o-" if len(x) <= 100 else "-"  # 1000 epochs of dots would hide the line
    whose = "first resumed run's" if reference_resumed else "fresh run's"
    ax_epoch.plot(x, [e["epoch_s"] for e in epochs], style, color="C0", label="epoch wall time")
    ax_step.plot(x, [e["step_median_s"] * 1000 for e in epochs], style, color="C1", label="median step time")
    ax_wait.plot(x, [100 * e["data_wait_frac"] for e in epochs], style, color="C2", label="waiting for data")
    full = max((e.get("steps", 0.0) for e in epochs), default=0.0)
    partial = [e for e in epochs if 0 < e.get("steps", full) < full]  # resumed mid-epoch: its steps after the resume
    if partial:
        ax_epoch.plot([int(e["epoch"]) for e in partial], [e["epoch_s"] for e in partial], "o", mfc="white",
                      mec="C0", ms=10, label="partial epoch (resumed mid-epoch: only the steps left)")
    if reference is not None:
        for ax, value in ((ax_epoch, reference["epoch_s"]), (ax_step, reference["step_median_s"] * 1000)):
            ax.axhspan(value * (1 - tolerance), value * (1 + tolerance), color=_BAND, alpha=0.15,
                       label=f"{whose} reference (epoch {int(reference['epoch'])}) ± {tolerance:.0%}")
            ax.axhline(value, color=_BAND, lw=1)
        ax_wait.axhline(100 * reference["data_wait_frac"], color=_BAND, lw=1,
                        label=f"{whose} reference (epoch {int(reference['epoch'])})")
    for i, epoch in enumerate(resumes):
        for ax in (ax_epoch, ax_step, ax_wait):
            ax.axvline(epoch - 0.5, color=_RESUME, ls="--", lw=1.5, label="resume" if i == 0 else None)
        ax_epoch.annotate(f"resume at epoch {epoch}", (epoch - 0.5, 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color=_RESUME,
                          bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    step_ms = {int(e["epoch"]): e["step_median_s"] * 1000 for e in epochs}
    for i, drift in enumerate(drifts):
        epoch = int(drift["epoch"])
        y = step_ms.get(epoch, drift.get("step_median_s", 0.0) * 1000)
        ax_step.plot([epoch], [y], "X", color=_DRIFT, ms=12, label="drift warning" if i == 0 else None)
        text = textwrap.fill(f"epoch {epoch}: median step {drift['ratio'] - 1:+.0%} vs the reference. Likely cause: "
                             f"{drift['cause']}", 70)
        ax_step.annotate(text, (epoch, y), xytext=(0.01, 0.97 - 0.22 * i), textcoords="axes fraction", va="top",
                         fontsize=8, color=_DRIFT, arrowprops={"arrowstyle": "->", "color": _DRIFT},
                         bbox={"boxstyle": "round", "fc": "white", "ec": _DRIFT, "alpha": 0.9})
    if drifts:  # headroom above the curve for the notes
        ax_step.set_ylim(0, 1.25 * max(step_ms.values(), default=1.0) * (1 + 0.35 * len(drifts)))
    ax_epoch.set(ylabel="epoch time (s)", title="Epoch times (EpochTiming)")
    ax_step.set(ylabel="median step (ms)")
    ax_wait.set(ylabel="data wait (% of train time)", xlabel="epoch")
    if epochs:  # headroom for the resume labels above the highest epoch
        ax_epoch.set_ylim(0, 1.15 * max(e["epoch_s"] for e in epochs))
    for ax in (ax_epoch, ax_step, ax_wait):
        if ax is not ax_step or not drifts:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if x:
        ax_wait.set_xlim(min(x) - 0.7, max(x) + 0.7)
        ax_wait.xaxis.get_major_locator().set_params(integer=True)
    return fig


def write(folder: str | Path, **history: Any) -> Path:
    """Draw the history into `folder`/epoch_times.png, atomically; returns the path."""
    import matplotlib

    path = Path(folder) / FILE_NAME
    fig = draw(**history)
    with matplotlib.style.context("default"), atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
