"""Weights & Biases logger: metrics, run params, checkpoints as artifacts, alerts, final status."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import threading
import time
from pathlib import Path
from typing import Any

from corebus import Cadence, ConfigError, Monitor, hookimpl
from corebus.kit import (
    LoggerOutbox,
    LogSink,
    OutboxTarget,
    atomic_path,
    check_choice,
    check_number,
    check_writable,
    read_spool,
    redact,
    require_module,
    run_status,
    step_points,
)

from .wandb_run import InThread, RunWriter

try:  # the SDK in a child process; without it, the SDK runs on the sink's worker thread
    from corebus import BackendProcess
except ImportError:  # pragma: no cover - depends on the core's version
    BackendProcess = None

log = logging.getLogger("corebus")

MODES = ("online", "offline", "disabled")
CHECKPOINT_POLICIES = ("kept", "all", False)
RUN_ID = re.compile(r"[a-z0-9]{1,64}")  # W&B's own ids; a snapshot's run id also names files here
# run.finish's exit code per status: the SDK has no "killed" API, 255 is its own Ctrl-C code.
EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 255}


class WandbLogger:
    """Log a run to W&B from ``on_log``, in ``Trainer.fit`` and in ``model.fit`` alike.

    What lands where (the conventions of W&B's own ``WandbMetricsLogger``), on one x axis,
    W&B's ``_step`` = the global optimizer step (exact under ``steps_per_execution``, gradient
    accumulation and resume):

    - every ``log_every_n_steps`` steps (boundary crossing): ``batch/<metric>`` and
      ``batch/learning_rate``; ``None`` logs epochs only;
    - at every epoch end: ``epoch/<metric>`` (``epoch/val_*``, ``epoch/learning_rate``,
      ``epoch/steps_per_second``) and ``epoch/epoch`` (0-based). W&B steps must only grow, so
      the epoch values join the row of the epoch's last step (one row per step);
    - ``trainer.run_params()`` (fit arguments, optimizer, plugin configs, secrets redacted)
      as the run config;
    - checkpoints (``on_checkpoint_saved``) as versions of the ``model`` artifact
      ``run_<id>_model``, with aliases ``step_<N>``, ``latest`` (the newest) and ``best`` (the
      best by the checkpoint's monitor, as W&B's ``WandbModelCheckpoint``), following
      ``log_checkpoints``: ``"kept"`` (default; ``True`` means the same) uploads, when the fit
      ends, the checkpoints the checkpoint plugin kept (those still on disk: a ``save_top_k=4``
      run holds 4 versions, not one per save); ``"all"`` uploads each one as it is announced
      (a hard link keeps a file rotated away before its upload); ``False`` none. The run
      summary holds ``best/<monitor>``, ``best/epoch`` (0-based) and ``best/step`` of the best
      checkpoint announced;
    - alerts (``on_alert``): ``run.alert`` in online mode, and always a ``summary["alerts"]``
      list (offline, ``run.alert`` would only fire, stale, when the run is synced);
    - time: each history row's ``_timestamp`` is the wall time its step (or epoch) ended, not
      when the row reached W&B. W&B measures a run's runtime itself, from ``wandb.init`` to
      ``finish``, and has no way to set it: so the run starts when the fit does (at the first
      ``on_epoch_begin``, once a snapshot restore chose the run id) and ``fit`` waits for it,
      up to ``start_timeout`` seconds, once (W&B's own Keras callbacks need ``wandb.init``
      before ``fit`` for the same reason); ``finish`` is the fit's end. A start that fails or
      times out is only logged: the records wait in the sink and its spool;
    - the end: ``finish(exit_code=0)`` on success, ``1`` on an exception, ``255`` on
      ``KeyboardInterrupt`` (the SDK has no "killed" API; 255 is its own Ctrl-C code), and
      ``summary["corebus/status"]`` = ``FINISHED`` / ``FAILED`` / ``KILLED``. Inside
      ``model.fit`` Keras has no exception hook: the status is only set by ``on_train_end``.

    System metrics (CPU, memory, disk, network, GPU where present) are W&B's own, on by default
    as in W&B, sampled for the training process (``x_stats_pid``) even when the SDK runs in a
    child. Switch them off with the environment variable ``WANDB__DISABLE_STATS=true`` (W&B's
    setting ``x_disable_stats``); ``WANDB__STATS_SAMPLING_INTERVAL`` sets the seconds between
    samples (15 by default).

    Every SDK call, ``wandb.init`` included (0.5-1 s the first time in a process, as it
    starts the wandb-core service; 0.1-0.2 s after), is made for a :class:`corebus.LogSink`
    worker: a step never waits on W&B. With ``isolate_sdk`` (the default, except in
    ``"disabled"`` mode) the SDK lives in a child process at lower CPU priority
    (:class:`corebus.BackendProcess`): the protobuf record it builds per row and its asyncio
    thread then never hold the training process's interpreter lock. ``isolate_sdk=False``
    keeps it in this process (where a test can patch ``wandb``). Records not delivered are spooled to
    ``<dir>/wandb-<run id>.spool.jsonl``; replay them with ``corebus sync <dir>``. Re-sent
    records are harmless: W&B ignores steps at or below its last one.

    Resume: ``state_dict()`` holds the run id and the best checkpoint; a run restored from a
    snapshot logs to the same run (``resume="allow"``); offline, W&B writes a new
    ``offline-run-*`` directory with the same id, which ``wandb sync`` appends to the run. Steps
    the interrupted process already delivered (after the snapshot was taken) are not logged
    again: the last delivered step and the keys delivered at it are noted in
    ``<dir>/wandb-<run id>.step`` after each delivery (a step's epoch record may not have gone
    with its batch points). Points handed over before a snapshot are delivered (or spooled)
    before the snapshot counts (``state_dict()``), so a kill loses none. Only the chief logs
    under tf.distribute.

    :param project: W&B project (default ``$WANDB_PROJECT`` or ``"corebus"``).
    :param entity: W&B user or team (default: the account's).
    :param mode: ``"online"``, ``"offline"`` (no server, no network) or ``"disabled"``
        (default ``$WANDB_MODE`` or ``"offline"``).
    :param dir: where W&B writes ``wandb/`` and the spool (default ``$WANDB_DIR`` or
        ``./corebus-runs``).
    :param name: the run's display name.
    :param log_every_n_steps: batch metrics cadence in global steps, or ``None``.
    :param log_checkpoints: ``"kept"`` / ``True``, ``"all"`` or ``False`` (see above).
    :param shutdown_timeout: seconds ``fit`` waits at the end for W&B to take the records.
    :param tags: the run's tags.
    :param isolate_sdk: run the W&B SDK in a child process (default: yes, unless disabled).
    :param start_timeout: seconds ``fit`` waits at its start for the W&B run to be up.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    # A failing logger never stops training: one warning, then off after 5 failures in a row.
    error_policy = "disable"
    max_failures = 5

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike | None = None,
        name: str | None = None,
        log_every_n_steps: int | None = 10,
        log_checkpoints: str | bool = "kept",
        shutdown_timeout: float = 30.0,
        tags: list[str] | None = None,
        isolate_sdk: bool | None = None,
        start_timeout: float = 60.0,
    ):
        require_module("wandb", extra="wandb", what="WandbLogger")
        self.project = project or os.environ.get("WANDB_PROJECT") or "corebus"
        self.entity = entity
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        # Absolute: `corebus sync` may replay the spool from another working directory.
        self.dir = os.path.abspath(dir or os.environ.get("WANDB_DIR") or "corebus-runs")
        self.name = name
        # A tag is printed and stored by W&B: a secret in it (a ${VAR} value, a URL password) shows as ***.
        self.tags = [redact(str(tag)) for tag in tags or []]
        self.log_every_n_steps = log_every_n_steps
        self.log_checkpoints = "kept" if log_checkpoints is True else log_checkpoints
        if self.log_checkpoints not in CHECKPOINT_POLICIES:
            raise ConfigError(f'WandbLogger: log_checkpoints={log_checkpoints!r}; use "kept" (or True), "all" or False')
        self.shutdown_timeout = shutdown_timeout
        check_choice("WandbLogger", "mode", self.mode, MODES)
        check_number("WandbLogger", "log_every_n_steps", log_every_n_steps, at_least=1, integer=True, allow_none=True)
        check_number("WandbLogger", "shutdown_timeout", shutdown_timeout, at_least=0, unit="seconds")
        check_number("WandbLogger", "start_timeout", start_timeout, above=0, unit="seconds")
        self.start_timeout = start_timeout
        self.batch_log_cadence = Cadence.every_n(log_every_n_steps) if log_every_n_steps else None
        self.run_id: str | None = None
        self._resume_id: str | None = None
        self._resumed_step: int | None = None
        self._params: dict[str, Any] = {}
        # W&B's client builds a protobuf record per row and runs an asyncio thread: off the
        # training process unless asked (or nothing is written: mode "disabled").
        if isolate_sdk and BackendProcess is None:
            raise ConfigError(
                "WandbLogger: isolate_sdk=True needs corebus.BackendProcess, which this corebus "
                "lacks; leave isolate_sdk unset to run the SDK in this process"
            )
        self.isolate_sdk = (
            (self.mode != "disabled" and BackendProcess is not None) if isolate_sdk is None else bool(isolate_sdk)
        )
        self._outbox = LoggerOutbox("wandb", self._open_run, owner="WandbLogger", shutdown_timeout=shutdown_timeout)
        self._writer: Any = None  # the run's RunWriter behind call()/close(), in a child or here
        self._started = False
        self._kept: dict[str, tuple[int, dict[str, Any]]] = {}  # path -> (step, metadata) announced this fit
        self._best: dict[str, Any] | None = None  # {"monitor", "value", "epoch", "step"}
        self._monitors: dict[str, Monitor | None] = {}
        self._delivered_through: int | None = None  # a resumed run's steps already in W&B
        self._delivered_keys: set[str] = set()  # the keys delivered at that last step
        self._sent: tuple[int, set[str]] | None = None  # (last step sent, its keys) by this process
        self._model: Any = None

    @property
    def sink(self) -> LogSink | None:
        """The sink of the last run opened (kept after the run for its ``stats``)."""
        return self._outbox.sink

    def get_config(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "entity": self.entity,
            "mode": self.mode,
            "dir": self.dir,
            "name": self.name,
            "tags": self.tags,
            "log_every_n_steps": self.log_every_n_steps,
            "log_checkpoints": self.log_checkpoints,
            "shutdown_timeout": self.shutdown_timeout,
            "isolate_sdk": self.isolate_sdk,
            "start_timeout": self.start_timeout,
        }

    # ---------------------------------------------------------------- hooks (training thread)

    @hookimpl
    def on_train_begin(self, trainer: Any) -> None:
        check_writable(self.dir, "WandbLogger")
        if self._outbox.is_open:  # the last model.fit raised: Keras told no callback
            log.warning("WandbLogger: the previous fit ended without on_train_end; marking run %s FAILED", self.run_id)
            resume_id = self._resume_id  # a snapshot loaded since names the run to continue
            self._end("FAILED", "the fit ended without on_train_end (an exception inside model.fit)")
            self._resume_id = resume_id
        alphabet = string.ascii_lowercase + string.digits
        self.run_id = self._resume_id or "".join(secrets.choice(alphabet) for _ in range(8))
        self._params = trainer.run_params()  # configuration only (RunContext.run_params)
        self._resumed_step = None  # the outbox opens at the first record: a snapshot restore may still change run_id
        self._kept = {}
        self._model = trainer.model
        if self._resume_id is None:
            self._best = self._delivered_through = None
        self._sent = None
        self._started = True

    @hookimpl
    def on_state_restored(self, step: int) -> None:
        self._resumed_step = step
        try:  # {"step": last step delivered, "keys": the keys delivered at that step}
            noted = json.loads(self._step_file().read_text())
            self._delivered_through, self._delivered_keys = int(noted["step"]), set(noted["keys"])
            self._sent = (self._delivered_through, set(self._delivered_keys))
        except (OSError, ValueError, TypeError, KeyError):  # nothing delivered yet (or another directory)
            self._delivered_through = None

    @hookimpl
    def on_epoch_begin(self) -> None:
        # The first hook after every on_train_begin (a snapshot restore has chosen the run id):
        # W&B's runtime clock starts at wandb.init, so the run starts with the fit.
        if self._started and not self._outbox.is_open:
            self._outbox.open()
            self._start_run()

    @hookimpl
    def on_log_steps(self, records: list[Any]) -> None:
        if self.batch_log_cadence is None:
            return
        for step, at, values in step_points(records, self.batch_log_cadence):
            values = {f"batch/{name}": value for name, value in values.items()}
            values["_timestamp"] = at  # when the step ran, not when W&B gets the row
            self._put({"type": "log", "step": step, "values": values})

    @hookimpl
    def on_log(self, trainer: Any, step: int, logs: Any) -> None:  # epoch records (batch ones: on_log_steps)
        values = {f"epoch/{k}": float(v) for k, v in logs.items()}
        values["epoch/epoch"] = trainer.epoch
        values["_timestamp"] = time.time()
        self._put({"type": "log", "step": int(step), "values": values})

    @hookimpl
    def on_checkpoint_saved(self, filepath: str, step: int, metadata: dict[str, Any]) -> None:
        metadata = {**(metadata or {}), "step": int(step)}
        best = self._is_new_best(metadata)
        if best:
            self._best = {k: metadata.get(k) for k in ("monitor", "value", "epoch", "step")}
            self._put(
                {
                    "type": "summary",
                    "values": {
                        f"best/{metadata['monitor']}": metadata["value"],
                        "best/epoch": metadata.get("epoch"),
                        "best/step": int(step),
                    },
                }
            )
        if self.log_checkpoints == "all":
            self._put_artifact(filepath, metadata, ["latest", f"step_{step}"] + (["best"] if best else []))
        elif self.log_checkpoints == "kept":
            self._kept.pop(filepath, None)  # the same name written again: the newest counts
            self._kept[filepath] = (int(step), metadata)

    @hookimpl
    def on_alert(self, alert: Any) -> None:
        # May come from a watchdog thread: the outbox takes it from any thread (an alert goes
        # to the run's summary, not its history, so its order among the points does not matter).
        self._put(
            {
                "type": "alert",
                "kind": alert.kind,
                "title": alert.title,
                "text": alert.text,
                "level": alert.level,
                "step": alert.step,
                "epoch": alert.epoch,
                "time": alert.time,
            }
        )

    @hookimpl(trylast=True)  # after the checkpoint plugin's last save and rotation
    def on_train_end(self) -> None:
        self._end("FINISHED")

    @hookimpl
    def on_exception(self, exception: BaseException) -> None:
        status = run_status(exception)  # KILLED for Ctrl-C or a stop signal (corebus.Preempted)
        self._end(status, f"{type(exception).__name__}: {exception}"[:1000] if status == "FAILED" else None)

    def state_dict(self) -> dict[str, Any]:
        # Taken for a run snapshot: the points of the steps it holds reach W&B (or the spool)
        # first, so a kill after the snapshot loses none of them.
        self._outbox.flush()
        return {"run_id": self.run_id, "best": self._best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run_id, best = state.get("run_id"), state.get("best")
        if run_id is not None and not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
            raise ValueError(f"WandbLogger: the snapshot's run id {run_id!r} is no W&B run id")
        if best is not None and not (isinstance(best, dict) and isinstance(best.get("value"), (int, float))):
            raise ValueError(f"WandbLogger: the snapshot's best checkpoint {best!r} is malformed")
        self.run_id = self._resume_id = run_id
        self._best = best

    # ---------------------------------------------------------------- checkpoints

    def _is_new_best(self, metadata: dict[str, Any]) -> bool:
        """Whether this checkpoint beats the best so far by its monitor (the plugin's
        ``save_last`` copies repeat a save and never count)."""
        monitor, value = metadata.get("monitor"), metadata.get("value")
        if monitor is None or value is None or metadata.get("last"):
            return False
        direction = self._direction(monitor)
        if direction is None:
            return False
        best = self._best if self._best and self._best.get("monitor") == monitor else None
        return best is None or direction.better(float(value), float(best["value"]))

    def _direction(self, monitor: str) -> Monitor | None:
        if monitor not in self._monitors:
            direction = Monitor(monitor, owner="WandbLogger")
            self._monitors[monitor] = direction if direction.try_resolve(self._model) else None
            if self._monitors[monitor] is None:
                log.info("WandbLogger: the direction of %r is unknown; no 'best' alias", monitor)
        return self._monitors[monitor]

    def _put_kept(self) -> None:
        """The checkpoints the checkpoint plugin kept (still on disk), oldest first."""
        kept = [(path, step, meta) for path, (step, meta) in self._kept.items() if Path(path).exists()]
        self._kept = {}
        ranked = [entry for entry in kept if self._direction_of(entry[2]) is not None and not entry[2].get("last")]
        best = None
        for entry in ranked:
            if best is None or self._direction_of(entry[2]).better(float(entry[2]["value"]), float(best[2]["value"])):
                best = entry
        for index, (path, step, meta) in enumerate(kept):
            aliases = (
                [f"step_{step}"]
                + (["latest"] if index == len(kept) - 1 else [])
                + (["best"] if best is not None and path == best[0] else [])
            )
            self._put_artifact(path, meta, aliases)

    def _direction_of(self, metadata: dict[str, Any]) -> Monitor | None:
        monitor = metadata.get("monitor")
        return None if monitor is None or metadata.get("value") is None else self._direction(monitor)

    def _put_artifact(self, filepath: str, metadata: dict[str, Any], aliases: list[str]) -> None:
        # Hard-linked aside (O(1)): a checkpoint rotated away (save_top_k) before the worker
        # uploads it is still there. A directory goes as it is (the writer removes staged files).
        staged = not Path(filepath).is_dir()
        path = str(self._outbox.stage(filepath)) if staged else filepath
        self._put(
            {
                "type": "artifact",
                "path": path,
                "name": Path(filepath).name,
                "staged": staged,
                "step": metadata["step"],
                "metadata": metadata,
                "aliases": aliases,
            }
        )

    # ---------------------------------------------------------------- delivery

    def _put(self, record: dict[str, Any]) -> None:
        if (
            record["type"] == "log"
            and self._delivered_through is not None
            and record["step"] <= self._delivered_through
        ):
            # The interrupted process delivered this step after the snapshot was taken; of the
            # last step it delivered, only the keys it sent (its epoch record may not have gone).
            if record["step"] < self._delivered_through:
                return
            values = {k: v for k, v in record["values"].items() if k.startswith("_") or k not in self._delivered_keys}
            if not any(not k.startswith("_") for k in values):
                return
            record = {**record, "values": values}
        self._outbox.put(record)

    def _open_run(self) -> OutboxTarget:
        """The outbox's opener: the run's writer (in a child process or here), its config first;
        the spool is ``<dir>/wandb-<run id>.spool.jsonl``."""
        settings = self._writer_settings()
        writer = BackendProcess(RunWriter, **settings) if self.isolate_sdk else InThread(RunWriter(**settings))
        self._writer = writer
        self._outbox.hold({"type": "config", "values": self._params, "resumed_step": self._resumed_step})
        header = {"plugin": "wandb", "config": {**self.get_config(), "run_id": self.run_id}}
        return OutboxTarget(self._send, self.dir, f"wandb-{self.run_id}", header, close=writer.close)

    def _start_run(self) -> None:
        """``wandb.init`` now, waiting up to ``start_timeout`` (on a helper thread, so a hung
        start cannot hold the fit longer); the sink's first send retries a failed start."""
        writer, failure = self._writer, []

        def start() -> None:
            try:
                writer.call("open")
            except Exception as exc:  # the sink retries and spools; training goes on
                failure.append(exc)

        began = time.perf_counter()
        thread = threading.Thread(target=start, name="corebus-wandb-start", daemon=True)
        thread.start()
        thread.join(self.start_timeout)
        if thread.is_alive():
            log.warning(
                "WandbLogger: the W&B run did not start within %.0f s; training goes on, its records wait for it",
                self.start_timeout,
            )
        elif failure:
            log.warning("WandbLogger: the W&B run could not start (%s); its records wait in the spool", failure[0])
        else:
            log.info("WandbLogger: run %s started in %.2f s", self.run_id, time.perf_counter() - began)

    def _end(self, status: str, error: str | None = None) -> None:
        if not self._started:  # fit failed before this plugin's on_train_begin: no run to end
            return
        self._started = False
        if self.log_checkpoints == "kept":
            self._put_kept()
        self._put({"type": "finish", "exit_code": EXIT_CODES[status], "status": status, "error": error})
        if self._outbox.close() and status == "FINISHED":  # closes the writer too
            self._step_file().unlink(missing_ok=True)  # no process will resume this run
        self._writer = None
        self._resume_id = None  # the next fit of this instance is a new run

    def _writer_settings(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "entity": self.entity,
            "mode": self.mode,
            "dir": self.dir,
            "name": self.name,
            "tags": self.tags,
            "run_id": self.run_id,
            # W&B's system metrics and run metadata describe this (training) process, even
            # when the SDK lives in a child.
            "stats_pid": os.getpid(),
            "program": _program(),
        }

    def _send(self, records: list[dict[str, Any]]) -> None:
        self._writer.call("send", records)
        logs = [r for r in records if r["type"] == "log"]
        if logs and self.mode != "disabled":  # what a resumed process need not log again
            last = max(r["step"] for r in logs)
            keys = {k for r in logs if r["step"] == last for k in r["values"]}
            if self._sent is not None and self._sent[0] == last:  # a step's batch and epoch records may go apart
                keys |= self._sent[1]
            self._sent = (last, keys)
            with atomic_path(self._step_file()) as tmp:
                Path(tmp).write_text(json.dumps({"step": last, "keys": sorted(keys)}))

    def _step_file(self) -> Path:
        return Path(self.dir) / f"wandb-{self.run_id}.step"

    @classmethod
    def replay_spool(cls, path: str | os.PathLike) -> int:
        """Deliver the records of a spool left by a run (``corebus sync``); returns how many."""
        require_module("wandb", extra="wandb", what="WandbLogger")
        header, records = read_spool(path)
        config = dict(header.get("config", {}))
        run_id = config.pop("run_id")
        logger = cls(**config)
        logger.run_id = run_id
        writer = RunWriter(**{**logger._writer_settings(), "run_id": run_id})
        # One record per call: W&B calls are not idempotent, so a failure must leave exactly
        # the records after the last one delivered.
        sent = LoggerOutbox.replay(path, writer.send, owner="WandbLogger", batch_size=1)
        if sent == len(records) and writer.run is not None:  # the run's status never came: it did not finish
            writer.send([{"type": "finish", "exit_code": 1, "status": "FAILED", "error": "no final status recorded"}])
        return sent


def _program() -> str | None:
    """The training program as W&B names it in the training process (``WANDB_PROGRAM``, which
    the child inherits, aside): the main script, or ``-m <module>``."""
    import __main__

    try:
        return __main__.__file__ if __main__.__spec__ is None else f"-m {__main__.__spec__.name}"
    except AttributeError:  # an interactive session: W&B says so itself
        return None
