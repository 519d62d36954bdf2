"""Run every benchmark, each in a fresh process, and end with one table of the results.

    python benchmarks/run_all.py                    # all of them (about 25 minutes on 2 cores)
    python benchmarks/run_all.py --quick            # fewer repeats: a smoke run, noisier numbers
    python benchmarks/run_all.py --only bench_engine.py bench_parity.py
    python benchmarks/run_all.py --out results.md   # also write the table and every output

Each benchmark prints its own variants, its ratios and each ratio's target (``results.record``);
this runner shows that output as it comes and then the summary: measure, value, target, met.
How the numbers are measured and what they were: docs/speed.md.
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

from results import met, show

HERE = Path(__file__).resolve().parent

# (script, full arguments, --quick arguments)
BENCHMARKS = [
    ("bench_engine.py", [], ["--epochs", "20", "--repeats", "2"]),
    ("bench_parity.py", [], ["--epochs", "10", "--repeats", "2"]),
    ("bench_plugins.py", [], ["--epochs", "20", "--repeats", "2"]),
    ("bench_loggers.py", [], ["--epochs", "150", "--repeats", "1"]),
    ("bench_mlflow.py", [], ["--epochs", "90", "--repeats", "2"]),
    ("bench_snapshot.py", [], ["--steps", "100", "--repeats", "1"]),
    ("bench_watchdog.py", [], ["--epochs", "20", "--repeats", "2", "--latency-runs", "2"]),
    ("bench_distributed.py", [], ["--epochs", "10", "--repeats", "2"]),
    ("bench_ray.py", [], ["--epochs", "4", "--repeats", "1"]),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--only", nargs="*", help="benchmark scripts to run (default: all)")
    parser.add_argument("--out", help="also write the summary and every benchmark's output to this markdown file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {script for script, _, _ in BENCHMARKS})
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; have {', '.join(s for s, _, _ in BENCHMARKS)}")
    results = Path(tempfile.mkdtemp(prefix="corebus-bench-")) / "results.jsonl"
    env = {**os.environ, "COREBUS_BENCH_RESULTS": str(results), "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_SILENT": "true"}
    outputs, failed, started = [], [], time.time()
    for script, full, quick in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        print(f"\n== {script}", flush=True)
        begin = time.perf_counter()
        run = subprocess.run(
            [sys.executable, str(HERE / script), *(quick if args.quick else full)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines = [line for line in run.stdout.splitlines() if line.strip()]
        if run.returncode:
            failed.append(script)
            lines += [f"FAILED (exit {run.returncode}):", *run.stderr.strip().splitlines()[-5:]]
        print("\n".join(lines), flush=True)
        outputs.append((script, time.perf_counter() - begin, lines))
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    table = ["| benchmark | measure | value | target | met |", "|---|---|---|---|---|"]
    table += [
        f"| {r['benchmark']} | {r['measure']} | {show(r['value'], r['unit'])} | {r['target']} | "
        f"{met(r['value'], r['target'])} |"
        for r in rows
    ]
    header = (
        f"{time.strftime('%Y-%m-%d', time.gmtime(started))}, `python benchmarks/run_all.py"
        f"{' --quick' if args.quick else ''}`, {(time.time() - started) / 60:.0f} min; {machine()}"
    )
    print(f"\n{header}\n\n" + "\n".join(table))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    if args.out:
        text = [f"# Benchmark results{' (quick run)' if args.quick else ''}", "", header + ".", "", *table, ""]
        for script, seconds, lines in outputs:
            text += [f"## {script} ({seconds:.0f} s)", "", "```", *lines, "```", ""]
        Path(args.out).write_text("\n".join(text))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
