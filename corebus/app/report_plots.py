"""The run report's plots: matplotlib figures drawn from ``report.json`` (curves, learning rate,
gradient norm, timeline of checkpoints and alerts, plugin overhead), as PNG bytes.

matplotlib is imported only when something is drawn, through its object-oriented API and the
Agg canvas: no pyplot, no global backend switch in the user's process. The same report gives
the same bytes (no rendering date in the PNGs).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_NOT_CURVES = ("learning_rate", "steps_per_second")
_LEVEL_COLORS = {"info": "tab:blue", "warning": "tab:orange", "error": "tab:red"}


def best_epoch(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """EarlyStopping's best epoch when it ran, else the epoch of the lowest ``val_loss`` (or ``loss``)."""
    stopper = report.get("early_stopping")
    if stopper and stopper.get("best") is not None:
        return {
            "monitor": stopper["monitor"],
            "epoch": stopper["best_epoch"],
            "value": stopper["best"],
            "source": stopper.get("plugin", "early_stopping"),
        }
    epochs = report.get("epochs") or []
    for monitor in ("val_loss", "loss"):
        points = [(e["logs"][monitor], e["epoch"]) for e in epochs if _finite(e["logs"].get(monitor))]
        if points:
            value, epoch = min(points)
            return {"monitor": monitor, "epoch": epoch, "value": value, "source": f"lowest {monitor}"}
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------- compare


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (8.0, 4.0)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    # No "Software" stamp beyond matplotlib's own and no date: the same JSON, the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _curve_names(epochs: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for record in epochs:
        keys += [k for k in record["logs"] if k not in keys and not k.startswith(_NOT_CURVES)]
    bases = [k for k in keys if not k.startswith("val_")]
    bases += [k[4:] for k in keys if k.startswith("val_") and k[4:] not in bases]
    return sorted(bases, key=lambda k: (k != "loss", keys.index(k) if k in keys else len(keys)))[:6]


def _step_to_epoch(report: Mapping[str, Any]) -> Any:
    """Maps a global step to a fractional epoch (1 = end of the first epoch) for batch curves."""
    import numpy as np

    epochs = report.get("epochs") or []
    knots_x = [report.get("run", {}).get("first_step", 0)] + [e["step"] for e in epochs]
    knots_y = [epochs[0]["epoch"] if epochs else 0] + [e["epoch"] + 1 for e in epochs]
    return lambda steps: np.interp(steps, knots_x, knots_y)


def _draw_curves(report: Mapping[str, Any]) -> Any:
    epochs = report.get("epochs") or []
    names = _curve_names(epochs)
    if not names:
        return None
    figure, axes = _figure(1, len(names), (4.2 * len(names), 3.6))
    x = [e["epoch"] + 1 for e in epochs]
    best = best_epoch(report)
    batches = report.get("batches") or {}
    for ax, name in zip(axes[0], names):
        if name in (batches.get("values") or {}) and len(epochs) > 0:
            steps, values = _series(batches, name)
            # Beneath the epoch curves and fainter the denser it is: at small batch sizes
            # thousands of noisy points would otherwise cover them.
            ax.plot(
                _step_to_epoch(report)(steps),
                values,
                color="tab:gray",
                lw=0.6,
                zorder=1,
                alpha=max(0.08, min(0.35, 60 / max(len(values), 1))),
                label=f"{name} (every {batches.get('every')} steps)",
            )
        for key, style in ((name, "o-"), (f"val_{name}", "s--")):
            points = [(xi, e["logs"][key]) for xi, e in zip(x, epochs) if key in e["logs"]]
            if points:
                ax.plot(*zip(*points), style, ms=3, lw=1.6, zorder=3, label=key)
        if best is not None:
            ax.axvline(best["epoch"] + 1, color="tab:green", ls=":", lw=1.2, label=f"best epoch {best['epoch'] + 1}")
            record = next((e for e in epochs if e["epoch"] == best["epoch"]), None)
            if record and best["monitor"] in record["logs"] and best["monitor"].removeprefix("val_") == name:
                ax.plot([best["epoch"] + 1], [record["logs"][best["monitor"]]], "*", color="tab:green", ms=12)
        ax.set(title=name, xlabel="epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return figure


def _series(batches: Mapping[str, Any], key: str) -> tuple[list[float], list[float]]:
    pairs = [(s, v) for s, v in zip(batches.get("step", []), batches["values"][key]) if _finite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw_lr(report: Mapping[str, Any]) -> Any:
    batches = report.get("batches") or {}
    epochs = report.get("epochs") or []
    lr = report.get("lr") or {}
    batch_keys = [k for k in (batches.get("values") or {}) if k.startswith("learning_rate")]
    epoch_keys = sorted({k for e in epochs for k in e["logs"] if k.startswith("learning_rate")})
    if not batch_keys and not epoch_keys:
        return None
    figure, axes = _figure(size=(8.0, 3.8))
    ax = axes[0][0]
    for key in batch_keys:
        ax.plot(*_series(batches, key), lw=1.2, label=f"{key} (every {batches.get('every')} steps)")
    for key in epoch_keys:
        points = [(e["step"], e["logs"][key]) for e in epochs if key in e["logs"]]
        ax.plot(*zip(*points), "o", ms=4, mfc="none", label=f"{key} at epoch end")
    for r in lr.get("reductions") or []:
        ax.axvline(r["step"], color="tab:red", ls="--", lw=1)
        ax.annotate(
            f"plateau x{_fmt(r['factor'])}\nepoch {r['epoch'] + 1}",
            (r["step"], 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="tab:red",
            va="top",
            ha="right",
        )
    for w in lr.get("warmup") or []:
        ax.axvline(w["end_step"], color="tab:green", ls=":", lw=1.2, label=f"warm-up end (step {w['end_step']})")
    ax.set(title="learning rate", xlabel="global step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure


def _draw_grad_norm(report: Mapping[str, Any]) -> Any:
    batches = report.get("batches") or {}
    keys = [k for k in (batches.get("values") or {}) if k.startswith("grad_norm")]
    if not keys:
        return None
    figure, axes = _figure(size=(8.0, 3.6))
    ax = axes[0][0]
    for key in keys:
        ax.plot(*_series(batches, key), lw=1, label=key)
    ax.set(title=f"gradient norm (before clipping, every {batches.get('every')} steps)", xlabel="global step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure


def _draw_timeline(report: Mapping[str, Any]) -> Any:
    epochs = report.get("epochs") or []
    checkpoints = report.get("checkpoints") or []
    alerts = report.get("alerts") or []
    lr = report.get("lr") or {}
    if not (epochs or checkpoints or alerts):
        return None
    figure, axes = _figure(size=(9.0, 3.4))
    ax = axes[0][0]
    lanes = ["epochs", "checkpoints", "LR", "alerts"]
    ax.plot([e["step"] for e in epochs], [0] * len(epochs), "|", ms=14, color="gray")
    for c in checkpoints:  # filled: still on disk at the end; hollow: deleted by the keep policy
        kept = c.get("kept", True) is not False
        ax.plot(c["step"], 1, "v", color="tab:purple", mfc="tab:purple" if kept else "none")
    for (step, label), height in zip(timeline_labels(checkpoints), (6, 16, 26) * len(checkpoints)):
        ax.annotate(label, (step, 1), fontsize=6, xytext=(2, height), textcoords="offset points")
    for r in lr.get("reductions") or []:
        ax.plot(r["step"], 2, "D", color="tab:red")
    for w in lr.get("warmup") or []:
        ax.plot(w["end_step"], 2, ">", color="tab:green")
    for a in alerts:
        step = a.get("step") or 0
        ax.plot(step, 3, "o", color=_LEVEL_COLORS.get(a.get("level"), "black"))
        ax.annotate(a.get("kind", ""), (step, 3), fontsize=7, xytext=(3, 4), textcoords="offset points")
    stopper = report.get("early_stopping") or {}
    stopped = next(
        (e["step"] for e in epochs if stopper.get("stopped_epoch") and e["epoch"] == stopper["stopped_epoch"]), None
    )
    if stopped is not None:
        ax.axvline(stopped, color="black", ls="--", lw=1, label=f"early stop (epoch {stopper['stopped_epoch'] + 1})")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.3)
    ax.set(title="timeline", xlabel="global step")
    ax.grid(axis="x", alpha=0.3)
    return figure


def timeline_labels(checkpoints: Sequence[Mapping[str, Any]], most: int = 8) -> list[tuple[int, str]]:
    """The checkpoint labels the timeline draws: one per kept file, at its last save, at most
    ``most`` (the newest), stacked on three heights, so labels never smear into each other."""
    last: dict[str, Mapping[str, Any]] = {}
    for c in checkpoints:
        if c.get("kept", True) is not False:
            last[c["filepath"]] = c
    chosen = sorted(last.values(), key=lambda c: c["step"])[-most:]
    return [(int(c["step"]), Path(c["filepath"]).name) for c in chosen]


def _draw_overhead(report: Mapping[str, Any]) -> Any:
    profile = report.get("profile")
    if not profile:
        return None
    totals = sorted(((sum(h["seconds"] for h in hooks.values()), name) for name, hooks in profile.items()))
    figure, axes = _figure(size=(8.0, 0.45 * len(totals) + 1.4))
    ax = axes[0][0]
    ax.barh([name for _, name in totals], [seconds * 1e3 for seconds, _ in totals], color="tab:blue")
    for i, (seconds, name) in enumerate(totals):
        calls = sum(int(h["calls"]) for h in profile[name].values())
        ax.annotate(f" {seconds * 1e3:.1f} ms, {calls} calls", (seconds * 1e3, i), va="center", fontsize=7)
    ax.set(title="host time per plugin (all hooks)", xlabel="ms")
    return figure


# ---------------------------------------------------------------------- HTML
