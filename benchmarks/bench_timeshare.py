"""Steps/s of several training variants measured side by side in time, so machine noise cancels.

Round-based A/B runs on the shared 2-core machine move by 10-40 % from one 6-second run to the
next (the no-logger control of ``bench_mlflow.py`` read 0.6-1.5 of (a) round by round), and a
90-round pool still leaves an interval of +-2 %. Here every variant is a training process of
its own, all started at once and all warmed up, and the conductor lets exactly one of them
run at a time on the training core(s), in slices of ``--slice`` seconds (SIGSTOP/SIGCONT, in
an order that rotates every cycle). Each variant's rate is the steps it began inside its
slices over their total length; a slow spell of the machine falls on all of them alike.

Variants (``--variants``, any of):

- ``a``   ``Trainer.fit`` with no loggers
- ``b``   ``MLflowLogger(log_every_n_steps=1)`` to a real ``mlflow server`` (sqlite store, the
  server's default worker count) on the last CPU, training on the others
- ``c``   the same, ``log_every_n_steps=10``
- ``d``   a plugin whose ``on_log`` runs every step and does nothing (the engine's per-step
  logging path), ``e`` one that takes every step's record in bulk and reads its values
  (``on_log_steps``), as the loggers do, with no sink (both from ``bench_mlflow.py --decompose``)
- ``i``   no loggers, but MLflow's client imported and used once (what importing it costs a step)
- ``g``   every step's record taken in bulk and dropped unread (the step values and the held
  records, without (e)'s reads)
- ``h``   (b) with every request body built but not posted (MLflow's work in this process,
  without the HTTP exchange), ``n`` (b) with the sink's send a no-op (no body, no request)
- ``p``   (b) with MLflow's client in a child process (``isolate_sdk=True``), ``q`` (b) with
  the sink's thread at the training thread's priority (not lowered)
- ``t``   (b) to a second server, on the same CPU, whose sqlite store is in RAM (``/dev/shm``):
  what the server's disk writes (journal commits, writeback, their interrupts, which the
  kernel may run on the training core) cost the training process
- ``k``   (b) with its metric requests sent to ``ack_server.py`` on the server's CPU, which
  acknowledges without storing: the same requests and round trips, almost none of the
  server's CPU work

and copies ``a2``, ``b2``, ``b3``...: more processes of a variant. Each process keeps its own
speed for its whole life (+-5 %), so one process per variant places a ratio only that well;
with copies the output adds each variant's mean over its processes (``pooled``), and
``--paired`` runs copy k of every variant with hash seed k and no address randomisation.

Every variant counts steps with one ``on_train_batch_begin`` hook (a clock read and an append).
A stopped process's wall clock goes on, so the loggers' hand-off interval
(``corebus.LOGGER_FLUSH_SECONDS``, 2 s) is multiplied by the number of variants in each of
them: points go to the sink about as often per second of its own running time as they would
alone on the core (with 2 s of wall time, 4 variants sent 4 times as many requests).
At the end every logger must have delivered every point (failed requests are retried, and
counted in the output), and the server
is asked for the loss history of (b)'s run: one point per step trained.

Ratios: overall (steps over seconds, each variant) and per block of ``--block`` cycles (median
with a bootstrap 95 % interval over blocks).
Run: ``python benchmarks/bench_timeshare.py [--seconds 120] [--variants a,a2,b]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pool_rounds import interval  # noqa: E402  (bootstrap 95 % interval of the median)
from results import record  # noqa: E402

VARIANTS = {"a": "no loggers",
            "b": "MLflowLogger, every step", "c": "MLflowLogger, every 10 steps",
            "d": "on_log every step, doing nothing", "e": "every step's record taken in bulk, read",
            "i": "no loggers, MLflow's client imported and used",
            "g": "every step's record taken in bulk, unread",
            "h": "MLflowLogger, every step, bodies not posted", "n": "MLflowLogger, every step, nothing sent",
            "p": "MLflowLogger, every step, client in a child", "q": "MLflowLogger, every step, sink not niced",
            "t": "MLflowLogger, every step, server store in RAM",
            "k": "MLflowLogger, every step, metrics only acknowledged"}
LOGGING_TO_SERVER = ("b", "c", "h", "n", "p", "q", "t", "k")


def base(name: str) -> str:
    """``b3`` -> ``b``: copies of a variant (each its own process) carry a number."""
    return name.rstrip("0123456789")


def copy_number(name: str) -> str:
    """``b3`` -> ``"3"``, ``b`` -> ``""``."""
    return name[len(base(name)):]


def describe(name: str) -> str:
    return VARIANTS[base(name)] + (f" (copy {copy_number(name)})" if copy_number(name) else "")


# ---------------------------------------------------------------- one variant (a child process)

def worker(variant: str, uri: str, folder: Path, sharing: int, ack_uri: str | None) -> None:
    import corebus
    import corebus.integrations.mlflow
    import corebus.io
    import corebus.sinks
    from bench_engine import BATCH, load_data
    from bench_mlflow import HoldAndRead, OnLogEveryStep, TakeInBulk, send_metrics_to
    from corebus import hookimpl
    from corebus.demo import digits_mlp
    from corebus.integrations import MLflowLogger

    # Hand-offs per second of this process's own running time as alone on the core.
    corebus.sinks.LOGGER_FLUSH_SECONDS *= sharing
    corebus.integrations.mlflow.LOGGER_FLUSH_SECONDS *= sharing

    class StepTimes:
        def __init__(self):
            self.times = array("d")

        @hookimpl
        def on_train_batch_begin(self):
            self.times.append(time.perf_counter())

    class StopWhenAsked:
        @hookimpl
        def on_epoch_end(self, trainer):
            trainer.stop_training = (folder / "stop").exists()

    kind = base(variant)
    if kind == "h":
        corebus.integrations.mlflow._RestMetrics._post_direct = lambda self, bodies: None
    if kind == "n":
        MLflowLogger._send = lambda self, records: None
    if kind == "q":
        corebus.io.lower_thread_priority = lambda niceness=10: None
    if kind == "i":  # MLflow's client in this process, as (b) has it, but no logger
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments()

    def plugins():
        if kind in LOGGING_TO_SERVER:
            logger = MLflowLogger(tracking_uri=uri, experiment_name="timeshare", dir=folder / f"spool-{variant}",
                                  log_every_n_steps=10 if kind == "c" else 1, isolate_sdk=kind == "p")
            if kind == "k":
                send_metrics_to(logger, ack_uri)
            return [logger]
        return {"d": [OnLogEveryStep()], "e": [HoldAndRead()], "g": [TakeInBulk()]}.get(kind, [])

    x, y = load_data()

    def fit(epochs, extra):
        trainer = corebus.Trainer(digits_mlp(), optimizer="adam", loss="sparse_categorical_crossentropy",
                                  metrics=["accuracy"], plugins=extra, seed=0)
        trainer.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
        return trainer

    fit(2, plugins())  # tracing, MLflow's lazy imports and the server's first writes
    clock, loggers = StepTimes(), plugins()
    (folder / f"ready-{variant}").touch()
    os.kill(os.getpid(), signal.SIGSTOP)  # the conductor starts everyone's clock together
    trainer = fit(10**6, [clock, StopWhenAsked(), *loggers])
    result = {"times": list(clock.times), "steps": trainer.global_step}
    if loggers and isinstance(loggers[0], MLflowLogger):
        result.update(stats=loggers[0].sink.stats, run_id=loggers[0].run_id)
    elif loggers and isinstance(loggers[0], HoldAndRead):
        assert loggers[0].read >= trainer.global_step, loggers[0].read  # every step's values were read
    (folder / f"result-{variant}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the conductor

def stopped(process: subprocess.Popen) -> bool:
    with open(f"/proc/{process.pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


def conduct(processes: dict[str, subprocess.Popen], seconds: float, slice_seconds: float, warmup: float):
    """Alternate the variants; ``(variant, cycle, start, end)`` of each measured slice."""
    names = list(processes)
    orders = [names[i:] + names[:i] for i in range(len(names))]
    orders += [order[::-1] for order in orders]  # each variant follows each other one equally
    slices, cycle, begun, measured = [], 0, time.perf_counter(), 0.0
    while True:
        measuring = time.perf_counter() - begun >= warmup
        if measured >= seconds * len(names):
            return slices
        for name in orders[cycle % len(orders)]:
            process = processes[name]
            os.kill(process.pid, signal.SIGCONT)
            start = time.perf_counter()
            time.sleep(slice_seconds)
            os.kill(process.pid, signal.SIGSTOP)
            end = time.perf_counter()
            while not stopped(process):  # every thread of it is off the CPU before the next starts
                time.sleep(0.0005)
            if measuring:
                slices.append((name, cycle, start, end))
                measured += end - start
        cycle += 1


def began(times: list[float], start: float, end: float) -> int:
    """Steps begun in ``[start, end)`` (``times``: each step's start, ascending)."""
    return bisect_left(times, end) - bisect_left(times, start)


def rates_per_block(slices, times: dict[str, list[float]], block: int) -> dict[str, list[float]]:
    """Each variant's steps/s in each block of ``block`` cycles."""
    steps: dict[tuple[str, int], float] = {}
    seconds: dict[tuple[str, int], float] = {}
    first_cycle = slices[0][1]
    for name, cycle, start, end in slices:
        key = (name, (cycle - first_cycle) // block)
        steps[key] = steps.get(key, 0) + began(times[name], start, end)
        seconds[key] = seconds.get(key, 0) + end - start
    blocks = sorted({b for _, b in steps})
    complete = [b for b in blocks if all((name, b) in steps for name in times)][:-1] or blocks  # last may be cut
    return {name: [steps[(name, b)] / seconds[(name, b)] for b in complete] for name in times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="a,a2,b")
    parser.add_argument("--seconds", type=float, default=120.0, help="measured running time per variant")
    parser.add_argument("--slice", type=float, default=0.25, help="seconds one variant runs at a time")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of slices before measuring")
    parser.add_argument("--block", type=int, default=8, help="cycles per block of the per-block ratios")
    parser.add_argument("--paired", action="store_true",
                        help="copy k of each variant runs with PYTHONHASHSEED=k and without address randomisation")
    parser.add_argument("--save", help="write every measured slice (variant, cycle, start, end, steps) here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--sharing", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ack-uri", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.uri, Path(args.folder), args.sharing, args.ack_uri)
        return 0

    from bench_mlflow import ack_server
    from mlflow_server import MlflowServer

    names = args.variants.split(",")
    assert names[0] == "a" and {base(n) for n in names} <= set(VARIANTS) and len(set(names)) == len(names), \
        f"variants: a first, then any of {list(VARIANTS)}, copies numbered (a2, b2...)"
    cpus = sorted(os.sched_getaffinity(0))
    training_cpus = ",".join(map(str, cpus[:-1]))
    folder = Path(tempfile.mkdtemp(prefix="corebus-bench-timeshare-"))
    server = MlflowServer(folder, workers=None, cpus={cpus[-1]})
    server.start()
    in_ram = None
    if any(base(n) == "t" for n in names):
        in_ram = MlflowServer(Path(tempfile.mkdtemp(prefix="corebus-bench-timeshare-", dir="/dev/shm")), workers=None,
                              cpus={cpus[-1]})
        in_ram.start()
    uri = {name: (in_ram if base(name) == "t" else server).uri for name in names}
    acknowledger, ack_uri = ack_server({cpus[-1]}) if any(base(n) == "k" for n in names) else (None, None)
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name in names:
            command = ["taskset", "-c", training_cpus, sys.executable, __file__, "--worker", name, "--uri", uri[name],
                       "--folder", str(folder), "--sharing", str(len(names))]
            if ack_uri:
                command += ["--ack-uri", ack_uri]
            env = dict(os.environ)
            if args.paired:  # copy k of every variant: hash seed k, no address randomisation
                command = ["setarch", os.uname().machine, "-R"] + command
                env["PYTHONHASHSEED"] = copy_number(name) or "1"
            processes[name] = subprocess.Popen(command, env=env)
        for name, process in processes.items():
            while not ((folder / f"ready-{name}").exists() and stopped(process)):
                if process.poll() is not None:
                    raise RuntimeError(f"variant {name} exited with {process.returncode} before training")
                time.sleep(0.1)
        slices = conduct(processes, args.seconds, args.slice, args.warmup)
        (folder / "stop").touch()
        for process in processes.values():
            os.kill(process.pid, signal.SIGCONT)
        for name, process in processes.items():
            if process.wait(timeout=300) != 0:
                raise RuntimeError(f"variant {name} exited with {process.returncode}")
        results = {name: json.loads((folder / f"result-{name}.json").read_text()) for name in names}
        retried: dict[str, int] = {}
        for name, result in results.items():
            if "stats" in result:
                stats = result["stats"]
                # Everything delivered by the end; a request the server dropped (a kept-alive
                # connection it closed meanwhile) was retried from the spool, and is counted.
                assert stats["sent"] == stats["queued"], (name, stats)
                retried[name] = stats["failures"]
        from mlflow.tracking import MlflowClient

        for name in (n for n in names if base(n) in ("b", "p", "q", "t")):
            history = MlflowClient(uri[name]).get_metric_history(results[name]["run_id"], "loss")
            assert sorted(p.step for p in history) == list(range(1, results[name]["steps"] + 1)), f"({name}) lost points"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        server.stop()
        if acknowledger is not None:
            acknowledger.kill()
        if in_ram is not None:
            in_ram.stop()
            shutil.rmtree(in_ram.root, ignore_errors=True)

    times = {name: results[name]["times"] for name in names}
    blocks = rates_per_block(slices, times, args.block)
    seconds = {name: sum(end - start for n, _, start, end in slices if n == name) for name in names}
    total = {name: sum(began(times[name], start, end) for n, _, start, end in slices if n == name) / seconds[name]
             for name in names}
    if args.save:
        Path(args.save).write_text(json.dumps([[*row, began(times[row[0]], *row[2:])] for row in slices]))
    print(f"{len(slices)} slices of {args.slice} s, {statistics.mean(seconds.values()):.0f} s measured per variant, "
          f"blocks of {args.block} cycles: {len(blocks['a'])}; failed sends, retried: {retried or 'none'}")
    print(f"{'':<44}{'steps/s':>9}{'/ a':>8}{'block median':>14}{'95 % interval':>16}")
    for name in names:
        ratios = [r / a for r, a in zip(blocks[name], blocks["a"])]
        low, high = interval(ratios)
        print(f"  {name:<3}{describe(name):<39}{total[name]:>9.0f}{total[name] / total['a']:>8.3f}"
              f"{statistics.median(ratios):>14.3f}{low:>9.3f}-{high:.3f}")
        if name != "a" and name == base(name):
            record("timeshare", f"{name} {VARIANTS[name]} / a, time-shared", total[name] / total["a"],
                   ">= 0.97" if name == "b" else "")
    pooled(names, total)
    return 0


def pooled(names: list[str], total: dict[str, float]) -> None:
    """With copies: each variant's mean rate over its processes against (a)'s, and per copy
    number (same hash seed under --paired) the ratio to that copy of (a)."""
    kinds = sorted({base(n) for n in names}, key=names.index)
    if all(sum(base(n) == kind for n in names) == 1 for kind in kinds):
        return
    mean = {kind: statistics.mean(total[n] for n in names if base(n) == kind) for kind in kinds}
    print("pooled over copies (mean steps/s of the processes of each variant):")
    for kind in kinds:
        copies = [n for n in names if base(n) == kind]
        if kind == "a":
            detail = f"spread of a: {min(total[n] for n in copies) / mean['a']:.3f}-{max(total[n] for n in copies) / mean['a']:.3f}"
        else:
            paired = [total[n] / total["a" + copy_number(n)] for n in copies if "a" + copy_number(n) in total]
            detail = "ratio to a of the same copy: " + " ".join(f"{r:.3f}" for r in paired)
        print(f"  {kind:<3}{VARIANTS[kind]:<39}{mean[kind]:>9.0f}{mean[kind] / mean['a']:>8.3f}   "
              f"{len(copies)} processes, {detail}")
        if kind != "a":
            record("timeshare", f"{kind} {VARIANTS[kind]} / a, pooled over {len(copies)} processes each",
                   mean[kind] / mean["a"], ">= 0.97" if kind == "b" else "")


if __name__ == "__main__":
    sys.exit(main())
