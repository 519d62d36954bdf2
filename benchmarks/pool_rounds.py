"""Pool the steady-state rounds of several ``bench_mlflow.py`` outputs into one estimate.

A single 16-30-round run on the shared 2-core machine moves by several percent: the control
(a2), which is (a) again, has read 0.978 and 1.046. Pooling every round of several runs gives
the median per-round ratio to (a) with a bootstrap 95 % interval (resampled rounds, fixed
seed), for each variant, for (b) against the mean of the (a) and (a2) runs beside it, and
for MLflow's client in a child process against the same in this process.

Run: ``python benchmarks/pool_rounds.py benchmarks/runs/mlflow-own-core-*.txt``.
"""

from __future__ import annotations

import random
import re
import statistics
import sys

ROW = re.compile(r"^\s+(\(\w+\)) .*?\s{2,}\d+\s+[\d.]+\s{3}([\d. ]+)$")


def steady_rounds(text: str) -> dict[str, list[float]]:
    """Variant label to its per-round ratios to (a), from the steady-state table."""
    section = text.split("steady state (the run exists")[1].split("whole loop")[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = [float(value) for value in match.group(2).split()]
    return rows


def interval(values: list[float], draws: int = 4000) -> tuple[float, float]:
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws)]


def main(paths: list[str]) -> int:
    pooled: dict[str, list[float]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            rows = steady_rounds(handle.read())
        if "(a2)" in rows:
            rows["(b) / mean of (a), (a2)"] = [b / ((1 + a2) / 2) for b, a2 in zip(rows["(b)"], rows["(a2)"])]
        # MLflow's client in a child process against the same in this process: (b) / (b1) in
        # runs 7-11 (where the child was the default), (b2) / (b) since
        if "(b1)" in rows:
            rows["(b) / (b1)"] = [b / b1 for b, b1 in zip(rows["(b)"], rows["(b1)"])]
        if "(b2)" in rows:
            rows["(b2) / (b)"] = [b2 / b for b2, b in zip(rows["(b2)"], rows["(b)"])]
        print(f"{path}: " + ", ".join(f"{name} {statistics.median(v):.3f}" for name, v in rows.items() if name != "(a)"))
        for name, values in rows.items():
            pooled.setdefault(name, []).extend(values)
    print("\npooled steady-state rounds: median per-round ratio to (a), bootstrap 95 % interval")
    for name, values in pooled.items():
        if name != "(a)":
            low, high = interval(values)
            print(f"  {name:<26} {statistics.median(values):.3f}  ({low:.3f}-{high:.3f}), {len(values)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
