"""One place every benchmark reports its headline numbers to (``run_all.py`` collects them).

``record(...)`` appends one JSON line to the file named by ``$COREBUS_BENCH_RESULTS`` and does
nothing when it is unset, so each benchmark still runs alone and prints its own table.
"""

from __future__ import annotations

import json
import os


def record(benchmark: str, measure: str, value: float, target: str = "", unit: str = "") -> None:
    """``target`` in words (``">= 0.95"``), compared by run_all when it is ``>= x`` / ``<= x``."""
    path = os.environ.get("COREBUS_BENCH_RESULTS")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"benchmark": benchmark, "measure": measure, "value": float(value),
                                 "target": target, "unit": unit}) + "\n")
