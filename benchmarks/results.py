"""How every benchmark reports a headline number: ``record(...)`` prints it with its target, and
``run_all.py`` collects the records into one table.

``record`` always prints one line (``measure: value   target >= 0.98: met``), so each benchmark
run alone shows its ratios and targets; it also appends a JSON line to the file named by
``$COREBUS_BENCH_RESULTS`` when that is set (``run_all.py`` sets it).
"""

from __future__ import annotations

import json
import os


def met(value: float, target: str) -> str:
    """``"met"`` / ``"NOT met"`` for a target ``">= x"`` or ``"<= x"``; ``""`` without one."""
    for sign, holds in ((">=", value.__ge__), ("<=", value.__le__)):
        if target.startswith(sign):
            return "met" if holds(float(target[len(sign) :])) else "NOT met"
    return ""


def show(value: float, unit: str = "") -> str:
    if unit == "fraction":
        return f"{value:+.1%}"
    if unit == "steps/s":
        return f"{value:.0f} steps/s"
    return f"{value:.3f}" + (f" {unit}" if unit else "")


def record(benchmark: str, measure: str, value: float, target: str = "", unit: str = "") -> None:
    """``target`` in words (``">= 0.95"``); ``unit`` ``""`` for a ratio, ``"fraction"``, ``"s"``,
    ``"steps/s"``."""
    verdict = f"   target {target}: {met(float(value), target)}" if target else ""
    print(f"[{benchmark}] {measure}: {show(float(value), unit)}{verdict}", flush=True)
    path = os.environ.get("COREBUS_BENCH_RESULTS")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(
            json.dumps(
                {"benchmark": benchmark, "measure": measure, "value": float(value), "target": target, "unit": unit}
            )
            + "\n"
        )
