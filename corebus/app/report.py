"""The run report: ``report.json`` -> PNG plots + one self-contained ``report.html``.

The ``report`` plugin records a run and calls :func:`write_report` at its end; ``corebus report``
re-renders from the JSON alone and ``corebus compare`` overlays several runs. Rendering lives
in the core (it imports no plugin), so the command line can use it without training; the plots
are drawn in :mod:`corebus.app.report_plots`, the page and the files are made here. Nothing
here imports TensorFlow. The same JSON gives byte-identical PNGs and HTML.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from corebus.app.report_plots import (
    _NOT_CURVES,
    _draw_curves,
    _draw_grad_norm,
    _draw_lr,
    _draw_overhead,
    _draw_timeline,
    _figure,
    _finite,
    _fmt,
    _png,
    _series,
    best_epoch,
)
from corebus.delivery import storage
from corebus.delivery.io import atomic_path
from corebus.errors import ConfigError

REPORT_JSON = "report.json"
FORMAT = "corebus-report"
PLOTS = ("curves", "learning_rate", "grad_norm", "timeline", "overhead")
PROFILE_OFF = "profile off: Trainer(profile=True) (or KerasCallback(..., profile=True))"


# ---------------------------------------------------------------------- loading and writing


def find_report(path: str | os.PathLike) -> Path | str:
    """``report.json`` of a report directory, a run directory holding ``report/``, or the file
    (a storage URL such as ``s3://bucket/run`` is looked up the same way)."""
    if storage.is_remote(path):
        url = os.fspath(path).rstrip("/")
        for candidate in (url, storage.join(url, REPORT_JSON), storage.join(url, "report", REPORT_JSON)):
            if candidate.endswith("/" + REPORT_JSON) and storage.exists(candidate):
                return candidate
        raise ConfigError(
            f"no {REPORT_JSON} under {url!r} (nor under {storage.join(url, 'report')!r}): train with the report "
            "plugin (report_dir=URL) and pass that URL or its parent"
        )
    path = Path(path)
    for candidate in (path, path / REPORT_JSON, path / "report" / REPORT_JSON):
        if candidate.is_file() and candidate.name == REPORT_JSON:
            return candidate
    raise ConfigError(
        f"no {REPORT_JSON} at {str(path / REPORT_JSON)!r} (nor under {str(path / 'report')!r}): "
        "train with the report plugin (plugins=[{'name': 'report', 'report_dir': DIR}]) and pass "
        "DIR or its parent run directory"
    )


def load_report(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The report dict and the path it was read from; a clear error for anything else."""
    file = find_report(path)
    try:
        text = storage.read_bytes(file).decode("utf-8") if isinstance(file, str) else file.read_text(encoding="utf-8")
        report = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{str(file)!r} is not a readable report ({exc}); re-run training to write it again"
        ) from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ConfigError(f'{str(file)!r} is not a corebus run report (no "format": "{FORMAT}")')
    return report, file


def write_report(report: Mapping[str, Any], report_dir: str | os.PathLike) -> list[Path] | list[str]:
    """Write ``report.json`` (atomically) and render it; returns every file written. To a storage
    URL: the files are made locally and uploaded, ``report.json`` last (what readers look for)."""
    if storage.is_remote(report_dir):
        return _upload_rendered(report, os.fspath(report_dir), with_json=True)
    report_dir = Path(report_dir)
    with atomic_path(report_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return [report_dir / REPORT_JSON] + render_report(report, report_dir)


def _upload_rendered(report: Mapping[str, Any], url: str, with_json: bool) -> list[str]:
    staging = Path(tempfile.mkdtemp(prefix="corebus-report-"))
    try:
        files = write_report(report, staging) if with_json else render_report(report, staging)
        names = [p.name for p in files if p.name != REPORT_JSON] + ([REPORT_JSON] if with_json else [])
        for name in names:
            storage.upload(staging / name, storage.join(url, name))
        for name in PLOTS:  # a stale plot from an earlier rendering would contradict this report
            if f"{name}.png" not in names:
                storage.remove(storage.join(url, f"{name}.png"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [storage.join(url, name) for name in names]


def render_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path] | list[str]:
    """Draw the PNGs that have data and ``report.html`` embedding them; returns the paths."""
    if storage.is_remote(out_dir):
        return _upload_rendered(report, os.fspath(out_dir), with_json=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {
        "curves": _draw_curves,
        "learning_rate": _draw_lr,
        "grad_norm": _draw_grad_norm,
        "timeline": _draw_timeline,
        "overhead": _draw_overhead,
    }
    images: dict[str, bytes] = {}
    for name in PLOTS:
        figure = drawers[name](report)
        if figure is not None:
            images[name] = _png(figure)
            (out_dir / f"{name}.png").write_bytes(images[name])
        else:  # a stale plot from an earlier rendering would contradict this report
            (out_dir / f"{name}.png").unlink(missing_ok=True)
    (out_dir / "report.html").write_text(_report_html(report, images), encoding="utf-8")
    return [out_dir / f"{name}.png" for name in images] + [out_dir / "report.html"]


# ---------------------------------------------------------------------- what the report says


def _summary(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    run = report.get("run", {})
    epochs = report.get("epochs") or []
    rows = [("run", str(run.get("name", ""))), ("status", str(run.get("status", "")))]
    if run.get("error"):
        rows.append(("error", str(run["error"])))
    rows += [
        ("epochs", str(len(epochs))),
        ("steps", str(run.get("global_step", ""))),
        ("time", f"{run.get('seconds', 0):.1f} s"),
    ]
    if epochs:
        rows += [(f"final {k}", _fmt(v)) for k, v in epochs[-1]["logs"].items() if not k.startswith(_NOT_CURVES)]
    best = best_epoch(report)
    if best:
        rows.append(("best epoch", f"{best['epoch'] + 1} ({best['monitor']} {_fmt(best['value'])}, {best['source']})"))
    stopper = report.get("early_stopping")
    if stopper:
        stopped = stopper.get("stopped_epoch") or 0
        rows.append(("early stopping", f"stopped at epoch {stopped + 1}" if stopped else "did not stop early"))
    lr = report.get("lr", {})
    reductions = lr.get("reductions") or []
    rows.append(
        ("LR reductions", ", ".join(f"epoch {r['epoch'] + 1} x{_fmt(r['factor'])}" for r in reductions) or "none")
    )
    for warmup in lr.get("warmup") or []:
        rows.append(("warm-up", f"{warmup['end_step']} steps ({warmup['optimizer']}, {warmup['plugin']})"))
    rows.append(("checkpoints", _checkpoint_counts(report)))
    alerts = report.get("alerts") or []
    rows.append(("alerts", ", ".join(f"{a['kind']} ({a['level']})" for a in alerts) or "none"))
    if report.get("profile") is None:
        rows.append(("overhead", report.get("profile_note") or PROFILE_OFF))
    return rows


# ---------------------------------------------------------------------- plots


def _checkpoint_counts(report: Mapping[str, Any]) -> str:
    """ "N saved, M kept": distinct files saved, and those still on disk at the end."""
    run = report.get("run", {})
    saved = run.get("checkpoints_saved")
    if saved is None:  # a report written before the counts existed: events only
        return f"{len(report.get('checkpoints') or [])} saved"
    kept = run.get("checkpoints_kept")
    return f"{saved} saved, {'?' if kept is None else kept} kept"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:1em 0}.failed{color:#b00}"
)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if any(header) else ''}{body}</table>"


def _img(name: str, png: bytes) -> str:
    return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _page(title: str, body: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _report_html(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    run = report.get("run", {})
    status = str(run.get("status", ""))
    body = [
        f"<h1>corebus run report: {html.escape(str(run.get('name', '')))}</h1>",
        f'<p class="{"failed" if status != "finished" else ""}">status: <b>{html.escape(status)}</b></p>',
        "<h2>Summary</h2>",
        _table(("", ""), _summary(report)),
    ]
    body += [f"<h2>{name.replace('_', ' ')}</h2>{_img(name, png)}" for name, png in images.items()]
    epochs = report.get("epochs") or []
    if epochs:
        keys = list(dict.fromkeys(k for e in epochs for k in e["logs"]))
        body += [
            "<h2>Epochs</h2>",
            _table(
                ["epoch", "step"] + keys,
                [[e["epoch"] + 1, e["step"]] + [e["logs"].get(k, "") for k in keys] for e in epochs],
            ),
        ]
    if report.get("checkpoints"):
        body += [
            "<h2>Checkpoints</h2>",
            _table(
                ("step", "epoch", "file", "kept", "metadata"),
                [
                    (
                        c["step"],
                        (c.get("epoch") or 0) + 1,
                        c["filepath"],
                        {True: "yes", False: "deleted"}.get(c.get("kept"), "?"),
                        json.dumps(c.get("metadata"), default=str),
                    )
                    for c in report["checkpoints"]
                ],
            ),
        ]
    if report.get("alerts"):
        body += [
            "<h2>Alerts</h2>",
            _table(
                ("step", "epoch", "level", "kind", "title", "text"),
                [
                    (
                        a.get("step"),
                        "" if a.get("epoch") is None else a["epoch"] + 1,
                        a.get("level"),
                        a.get("kind"),
                        a.get("title"),
                        a.get("text"),
                    )
                    for a in report["alerts"]
                ],
            ),
        ]
    if report.get("profile"):
        rows = [
            (name, hook, t["calls"], f"{t['seconds'] * 1e3:.2f}")
            for name, hooks in report["profile"].items()
            for hook, t in hooks.items()
        ]
        body += ["<h2>Plugin overhead</h2>", _table(("plugin", "hook", "calls", "ms"), rows)]
    return _page(f"{run.get('name', '') or 'run'} - corebus run report", body)


def _label(path: Path, report_file: Path) -> str:
    # A report directory named "report" inside a run directory is labelled by the run.
    directory = report_file.parent
    if path.is_dir() and path.resolve() != directory.resolve():
        return path.resolve().name  # a run directory holding report/
    return directory.parent.name if directory.name == "report" else directory.name


def _maximize(metric: str) -> bool:
    return any(word in metric for word in ("acc", "auc", "precision", "recall", "f1", "iou"))


def compare_reports(
    paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, metric: str = "val_loss"
) -> list[Path]:
    """Overlay several runs (loss, ``metric``, learning rate, accuracy) in ``compare.png``, with
    ``compare.html`` and ``compare.json``; runs are labelled by their directory names."""
    runs, labels = [], []
    for path in paths:
        report, file = load_report(path)
        label = _label(Path(path), file)
        while label in labels:  # two runs with the same directory name stay distinguishable
            label += "'"
        runs.append(report)
        labels.append(label)
    available = sorted({k for r in runs for e in r.get("epochs") or [] for k in e["logs"]})
    if metric not in available:
        raise ConfigError(f"--metric {metric!r} is in none of the reports; they log: {', '.join(available)}")
    panels = list(dict.fromkeys(["loss", metric, "learning_rate", "accuracy"]))
    panels = [p for p in panels if p == "learning_rate" or p in available]
    figure, axes = _figure(1, len(panels), (4.4 * len(panels), 3.8))
    for ax, panel in zip(axes[0], panels):
        for i, (label, report) in enumerate(zip(labels, runs)):
            color = f"C{i % 10}"
            if panel == "learning_rate":
                batches = report.get("batches") or {}
                if "learning_rate" in (batches.get("values") or {}):
                    ax.plot(*_series(batches, "learning_rate"), color=color, label=label)
                else:
                    points = [
                        (e["step"], e["logs"]["learning_rate"])
                        for e in report.get("epochs") or []
                        if "learning_rate" in e["logs"]
                    ]
                    if points:
                        ax.plot(*zip(*points), "o-", color=color, ms=3, label=label)
                continue
            keys = [(panel, "-")] + ([(f"val_{panel}", "--")] if panel == "accuracy" else [])
            for key, style in keys:
                points = [(e["epoch"] + 1, e["logs"][key]) for e in report.get("epochs") or [] if key in e["logs"]]
                if points:
                    ax.plot(*zip(*points), style, color=color, label=label if key == panel else f"{label} ({key})")
        ax.set(
            title=panel + (" (val dashed)" if panel == "accuracy" else ""),
            xlabel="global step" if panel == "learning_rate" else "epoch",
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    png = _png(figure)
    pick = max if _maximize(metric) else min
    summary = []
    for label, report, path in zip(labels, runs, paths):
        points = [(e["logs"][metric], e["epoch"]) for e in report.get("epochs") or [] if _finite(e["logs"].get(metric))]
        best = pick(points) if points else (None, None)
        final = (report.get("epochs") or [{"logs": {}}])[-1]["logs"]
        summary.append(
            {
                "label": label,
                "path": str(path),
                "status": report.get("run", {}).get("status"),
                "epochs": len(report.get("epochs") or []),
                f"best_{metric}": best[0],
                "best_epoch": None if best[1] is None else best[1] + 1,
                **{f"final_{k}": final.get(k) for k in ("loss", metric) if k in final},
            }
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.png").write_bytes(png)
    (out_dir / "compare.json").write_text(
        json.dumps({"metric": metric, "labels": labels, "runs": summary}, indent=1), encoding="utf-8"
    )
    header = list(dict.fromkeys(k for row in summary for k in row))
    body = [
        f"<h1>corebus compare: {html.escape(', '.join(labels))}</h1>",
        f"<p>{'highest' if pick is max else 'lowest'} {html.escape(metric)} per run</p>",
        _table(header, [[row.get(k) for k in header] for row in summary]),
        _img("compare", png),
    ]
    (out_dir / "compare.html").write_text(_page("corebus compare", body), encoding="utf-8")
    return [out_dir / "compare.png", out_dir / "compare.html", out_dir / "compare.json"]
