"""Run every benchmark, each in a fresh process, and write one markdown table of the results.

    python benchmarks/run_all.py [--quick] [--out benchmarks/RESULTS.md]

Each benchmark prints its own detailed table (kept in the output file, below the summary) and
reports its headline numbers through ``results.record``. ``--quick`` runs fewer repeats (a smoke
run: the numbers are noisier). The machine (CPU, cores, Python, TensorFlow, Keras) heads the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (script, full arguments, --quick arguments)
BENCHMARKS = [
    ("bench_engine.py", [], ["--epochs", "20", "--repeats", "2"]),
    ("bench_plugins.py", [], ["--epochs", "20", "--repeats", "2"]),
    ("bench_loggers.py", [], ["--epochs", "150", "--repeats", "1"]),
    ("bench_mlflow.py", [], ["--epochs", "90", "--repeats", "2"]),
    ("bench_mlflow.py", ["--server-own-core", "--decompose"], ["--server-own-core", "--epochs", "90", "--repeats", "2"]),
    ("bench_timeshare.py", ["--variants", "a,b,a2,b2,a3,b3,c,d,e", "--seconds", "40", "--paired"],
     ["--variants", "a,a2,b", "--seconds", "20", "--warmup", "10"]),
    ("bench_snapshot.py", [], ["--steps", "100", "--repeats", "1"]),
    ("bench_watchdog.py", [], ["--epochs", "20", "--repeats", "2", "--latency-runs", "2"]),
    ("bench_distributed.py", [], ["--epochs", "10", "--repeats", "2"]),
]


def machine() -> str:
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}")


def met(value: float, target: str) -> str:
    if target.startswith(">="):
        return "yes" if value >= float(target[2:]) else "**no**"
    if target.startswith("<="):
        return "yes" if value <= float(target[2:]) else "**no**"
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--only", nargs="*", help="benchmark scripts to run (default: all)")
    args = parser.parse_args(argv)
    results = Path(tempfile.mkdtemp(prefix="corebus-bench-")) / "results.jsonl"
    env = {**os.environ, "COREBUS_BENCH_RESULTS": str(results), "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_SILENT": "true"}
    outputs, started = [], time.time()
    for script, full, quick in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        arguments = quick if args.quick else full
        title = " ".join([script, *(a for a in full if a.startswith("--"))])  # the variant, not the sizes
        print(f"== {title}", flush=True)
        begin = time.perf_counter()
        run = subprocess.run([sys.executable, str(HERE / script), *arguments],
                             capture_output=True, text=True, env=env)
        lines = [line for line in run.stdout.splitlines() if line.strip()]
        print("\n".join(lines), flush=True)
        if run.returncode:
            lines.append(f"FAILED (exit {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
        outputs.append((title, time.perf_counter() - begin, lines))
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    table = ["| benchmark | measure | value | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        value = f"{row['value']:+.1%}" if row["unit"] == "fraction" else (
            f"{row['value']:.0f} {row['unit']}" if row["unit"] == "steps/s" else
            f"{row['value']:.3f}" + (f" {row['unit']}" if row["unit"] else ""))
        table.append(f"| {row['benchmark']} | {row['measure']} | {value} | {row['target']} | "
                     f"{met(row['value'], row['target'])} |")
    text = [f"# Benchmark results{' (quick run)' if args.quick else ''}", "",
            f"{time.strftime('%Y-%m-%d', time.gmtime(started))}, `python benchmarks/run_all.py"
            f"{' --quick' if args.quick else ''}`, {(time.time() - started) / 60:.0f} min; {machine()}.", "",
            *table, "", "## Each benchmark's own output", ""]
    for title, seconds, lines in outputs:
        text += [f"### {title} ({seconds:.0f} s)", "", "```", *lines, "```", ""]
    Path(args.out).write_text("\n".join(text))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
