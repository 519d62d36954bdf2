"""Notice when training stops making progress or goes wrong, and tell people (``on_alert``)."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import traceback
from typing import Any

from corebus import Cadence, Monitor, hookimpl
from corebus.kit import AlertGate, check_number

log = logging.getLogger("corebus")
_now = time.monotonic

_TRAIN, _VALIDATION, _EPOCH_END = "training", "validation", "epoch end"
KINDS = ("stall", "nan_loss", "plateau", "throughput_drop", "divergence")


class StallAlert:
    """A watchdog for hung runs plus four anomaly detectors; each raises a deduplicated alert.

    - **stall** (``timeout`` seconds, ``None`` to switch off): a watchdog thread raises an
      ``error`` alert when no step completes in time, wherever the training thread is stuck
      (data pipeline, a step, a plugin's hook), with the training thread's stack in the text
      and every thread's stack in ``details`` and the log; a ``stall_resolved`` alert follows
      when steps resume. The first step of a fit (compilation) gets ``first_step_timeout``;
      epoch-end work (metrics, validation, checkpoints) gets ``timeout + grace``. The training thread
      only stores a timestamp per step: no lock, no wake-up of the watchdog.
    - **nan_loss**: the batch loss is read every ``check_every`` steps (a :class:`corebus.Cadence`;
      the read costs the step's one host fetch), and at every epoch end.
    - **plateau** (``patience`` epochs, ``None`` = off): ``monitor`` has not improved by
      ``min_delta``. An alert, not a stop.
    - **throughput_drop** (``None`` = off): steps/s, measured over ``throughput_every`` steps
      (time in validation and epoch-end work left out), stays below ``throughput_drop`` x its
      running average for ``throughput_windows`` windows in a row.
    - **divergence**: the loss exceeds ``divergence_threshold``, or an epoch's loss exceeds
      ``divergence_factor`` x the lowest of the previous ``divergence_window`` epochs.

    Repeats of a kind are held back for ``cooldown`` seconds by the run's
    :class:`corebus.AlertGate`, whose state is saved with this plugin's.
    """

    error_policy = "warn"  # a broken detector must not stop the run it watches

    def __init__(
        self,
        timeout: float | None = 300.0,
        first_step_timeout: float | None = None,
        grace: float | None = None,
        check_every: int | None = 10,
        patience: int | None = None,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        mode: str = "auto",
        throughput_drop: float | None = 0.5,
        throughput_every: int = 50,
        throughput_windows: int = 3,
        divergence_threshold: float | None = None,
        divergence_factor: float | None = 10.0,
        divergence_window: int = 3,
        cooldown: float = 300.0,
    ):
        for name, value in (("timeout", timeout), ("first_step_timeout", first_step_timeout), ("grace", grace)):
            check_number("StallAlert", name, value, above=0, unit="seconds", allow_none=True)
        for name, value in (("check_every", check_every), ("patience", patience)):
            check_number("StallAlert", name, value, at_least=1, integer=True, allow_none=True)
        check_number("StallAlert", "throughput_drop", throughput_drop, above=0, below=1, allow_none=True)
        check_number("StallAlert", "divergence_factor", divergence_factor, above=1, allow_none=True)
        self.timeout = timeout
        self.first_step_timeout = first_step_timeout or (max(timeout, 600.0) if timeout else None)
        self.grace = grace or (max(timeout, 30.0) if timeout else None)
        self.check_every = check_every
        self.patience = patience
        self.monitor = monitor
        self.min_delta = min_delta
        self.throughput_drop = throughput_drop
        self.throughput_every = int(throughput_every)
        self.throughput_windows = int(throughput_windows)
        self.divergence_threshold = divergence_threshold
        self.divergence_factor = divergence_factor
        self.divergence_window = int(divergence_window)
        self.cooldown = float(cooldown)
        self._monitor = Monitor(monitor, mode, min_delta, owner="StallAlert") if patience else None
        self._loss_due = Cadence.every_n(check_every) if check_every else None
        self._rate_due = Cadence.every_n(self.throughput_every) if throughput_drop else None
        self._tick = max(0.02, min(timeout / 4, 30.0)) if timeout else None
        self._gate: AlertGate | None = None
        self._gate_state: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reset()
        self._start_fit(0)
        self._resumed = False

    def _start_fit(self, step: int) -> None:
        self._start_step = step
        self._phase, self._beat, self._stalled_at = _TRAIN, _now(), None
        self._window: tuple[float, int, float] | None = None
        self._paused, self._pause_from = 0.0, None
        self._baseline: float | None = None
        self._slow = 0

    def _reset(self) -> None:
        self.best: float | None = None
        self.wait = 0
        self.losses: list[float] = []
        self.alerted: set[str] = set()

    # ---------------------------------------------------------------- lifecycle

    @hookimpl
    def on_train_begin(self, trainer):
        self._stop_watchdog()  # a model.fit that crashed never reached on_train_end
        if not self._resumed:  # a state loaded for a resume survives this one call
            self._reset()
        self._resumed = False
        self._gate = AlertGate.of(trainer)
        for kind in KINDS:
            self._gate.set_cooldown(kind, self.cooldown)
        if self._gate_state is not None:
            self._gate.load_state_dict(self._gate_state)
            self._gate_state = None
        self._start_fit(trainer.global_step)
        if self.timeout:
            self._thread_id = threading.get_ident()
            self._fit_frame = _innermost_fit_frame()
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._watch, args=(trainer, self._stop), name="corebus-stall-watchdog", daemon=True
            )
            self._thread.start()

    @hookimpl(tryfirst=True)
    def on_train_end(self, trainer):
        if self._stop_watchdog() is not None:
            self._resolve(trainer)  # reaching the end is progress too

    @hookimpl
    def on_exception(self):
        self._stop_watchdog()

    @hookimpl
    def on_state_restored(self, trainer):
        self._start_step = trainer.global_step  # the first step after a resume compiles again

    # ---------------------------------------------------------------- progress (hot path)

    @hookimpl
    def on_train_batch_end(self, trainer, logs):
        self._beat = _now()  # all the watchdog needs from the training thread
        if self._loss_due is not None and self._loss_due.due_now(trainer) and "loss" in logs:
            self._check_loss(trainer, logs["loss"], "batch")
        if self._rate_due is not None and self._rate_due.due_now(trainer):
            self._sample_throughput(trainer)

    @hookimpl
    def on_epoch_begin(self):
        if self._pause_from is not None:
            self._paused += _now() - self._pause_from
            self._pause_from = None
        self._phase, self._beat = _TRAIN, _now()

    @hookimpl(tryfirst=True)
    def on_test_begin(self):
        self._enter(_VALIDATION)

    @hookimpl
    def on_test_batch_end(self):
        self._beat = _now()

    # Before the other plugins' epoch ends, which is where checkpoints are written.
    @hookimpl(tryfirst=True)
    def on_epoch_end(self, trainer, epoch, logs):
        self._enter(_EPOCH_END)
        if self._loss_due is not None and logs and "loss" in logs:
            self._check_loss(trainer, logs["loss"], f"end of epoch {epoch}")
        if self.patience:
            self._check_plateau(trainer, epoch, logs)
        if self.divergence_factor and logs and "loss" in logs:
            self._check_growth(trainer, epoch, float(logs["loss"]))

    @hookimpl
    def on_checkpoint_saved(self):
        self._beat = _now()

    def _enter(self, phase: str) -> None:
        if self._pause_from is None:
            self._pause_from = _now()
        self._phase, self._beat = phase, _now()

    # ---------------------------------------------------------------- the watchdog thread

    def _limit(self, trainer: Any, phase: str) -> float:
        if phase != _TRAIN:
            return self.timeout + self.grace
        if trainer.global_step == self._start_step:
            return self.first_step_timeout
        steps = trainer.params.get("steps")
        if steps and trainer.batch + 1 >= steps:
            # The epoch's last batch is done: the engine computes (and, the first time, traces)
            # the epoch's metrics before any hook marks the epoch end.
            return self.timeout + self.grace
        return self.timeout

    def _watch(self, trainer: Any, stop: threading.Event) -> None:
        wait = self._tick
        while not stop.wait(wait):
            try:
                wait = self._tick
                beat, phase, now = self._beat, self._phase, _now()
                if self._stalled_at is not None:
                    if beat != self._stalled_at:
                        self._resolve(trainer)
                    else:  # look often while stalled: the resolution names the step it resumed at
                        wait = min(self._tick, 0.1)
                    continue
                limit = self._limit(trainer, phase)
                if now - beat < limit:
                    wait = min(beat + limit - now, self._tick)
                elif not self._fit_alive():
                    return  # fit exited without on_train_end (model.fit has no exception hook)
                else:
                    self._raise_stall(trainer, beat, now - beat, phase, limit)
            except Exception as exc:  # the watchdog must outlive any one failed alert
                log.warning("StallAlert watchdog: %s: %s", type(exc).__name__, exc)

    def _raise_stall(self, trainer: Any, beat: float, idle: float, phase: str, limit: float) -> None:
        self._stalled_at = beat
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = {
            tid: "".join(traceback.format_stack(f))
            for tid, f in sys._current_frames().items()
            if tid != threading.get_ident()
        }
        details = "\n".join(
            f"Thread {names.get(tid, '?')} ({tid}), most recent call last:\n{stack}" for tid, stack in stacks.items()
        )
        train_stack = stacks.get(self._thread_id, "(not a Python thread any more)\n")
        step = trainer.global_step
        text = (
            f"No training step completed for {idle:.1f} s (limit {limit:g} s, in {phase}); last completed "
            f"step {step}, epoch {trainer.epoch}.\nTraining thread "
            f"({names.get(self._thread_id, '?')}), most recent call last:\n```\n{train_stack}```"
        )
        log.warning(
            "StallAlert: no training step for %.1f s at step %d; every thread's stack:\n%s", idle, step, details
        )
        trainer.alert("stall", f"Training stalled: no step for {idle:.0f} s", text, level="error", details=details)

    def _resolve(self, trainer: Any) -> None:
        if self._stalled_at is None:
            return
        stalled_for = self._beat - self._stalled_at
        self._stalled_at = None
        trainer.alert(
            "stall_resolved",
            "Training resumed",
            f"Progress again at step {trainer.global_step}, after about {stalled_for:.1f} s without a step.",
            level="info",
            resolves="stall",
        )

    def _fit_alive(self) -> bool:
        frame = sys._current_frames().get(self._thread_id)
        if self._fit_frame is None:
            return frame is not None
        while frame is not None:
            if id(frame) == self._fit_frame:
                return True
            frame = frame.f_back
        return False

    def _stop_watchdog(self) -> threading.Thread | None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=5.0)
        return thread

    # ---------------------------------------------------------------- detectors

    def _alert_once(self, trainer: Any, kind: str, title: str, text: str, level: str = "warning") -> None:
        if kind not in self.alerted:
            self.alerted.add(kind)
            trainer.alert(kind, title, text, level=level)

    def _check_loss(self, trainer: Any, loss: Any, where: str) -> None:
        loss = float(loss)
        at = f"step {trainer.global_step} (epoch {trainer.epoch}, {where})"
        if not math.isfinite(loss):
            self._alert_once(trainer, "nan_loss", "Non-finite loss", f"Loss is {loss} at {at}.", "error")
        elif self.divergence_threshold is not None and loss > self.divergence_threshold:
            self._alert_once(
                trainer,
                "divergence",
                "Loss diverging",
                f"Loss {loss:.4g} is above divergence_threshold={self.divergence_threshold:g} at {at}.",
                "error",
            )

    def _check_plateau(self, trainer: Any, epoch: int, logs: Any) -> None:
        self._monitor.resolve(trainer.model)
        value = self._monitor.value(logs)
        if value is None:
            return
        if self._monitor.is_improvement(value, self.best):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait == self.patience:  # once per plateau; an improvement starts a new one
            trainer.alert(
                "plateau",
                f"{self.monitor} has not improved for {self.patience} epochs",
                f"Best {self.monitor} {self.best:.6g}; {value:.6g} at epoch {epoch} (min_delta {self.min_delta:g}).",
            )

    def _check_growth(self, trainer: Any, epoch: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        previous = [v for v in self.losses if v > 0]
        if previous and loss > self.divergence_factor * min(previous):
            self._alert_once(
                trainer,
                "divergence",
                "Loss diverging",
                f"Loss {loss:.4g} at epoch {epoch} is {loss / min(previous):.1f}x the lowest of the "
                f"previous {len(self.losses)} epochs ({min(previous):.4g}).",
                "error",
            )
        self.losses = (self.losses + [loss])[-self.divergence_window :]

    def _sample_throughput(self, trainer: Any) -> None:
        now, step = _now(), trainer.global_step
        window, self._window = self._window, (now, step, self._paused)
        if window is None:
            return
        start, start_step, paused = window
        seconds = (now - start) - (self._paused - paused)  # validation and epoch ends left out
        rate = (step - start_step) / max(seconds, 1e-9)
        if self._baseline is None:  # windows start after the first due step: compilation is out
            self._baseline = rate
            return
        if rate < self.throughput_drop * self._baseline:
            self._slow += 1
            if self._slow == self.throughput_windows:
                trainer.alert(
                    "throughput_drop",
                    "Training slowed down",
                    f"{rate:.3g} steps/s over the last {self._slow * self.throughput_every} steps, "
                    f"below {self.throughput_drop:g} x the running average of {self._baseline:.3g} steps/s.",
                )
            return
        if self._slow >= self.throughput_windows:
            trainer.alert(
                "throughput_recovered",
                "Training speed recovered",
                f"{rate:.3g} steps/s (running average {self._baseline:.3g}).",
                level="info",
                resolves="throughput_drop",
            )
        self._slow = 0
        self._baseline = 0.9 * self._baseline + 0.1 * rate  # slow windows do not lower it

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        gate = self._gate.state_dict() if self._gate is not None else self._gate_state
        return {
            "best": self.best,
            "wait": self.wait,
            "losses": list(self.losses),
            "alerted": sorted(self.alerted),
            "gate": gate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.losses = [float(v) for v in state.get("losses", [])]
        self.alerted = set(state.get("alerted", []))
        self._gate_state = state.get("gate")
        if self._gate is not None and self._gate_state is not None:
            self._gate.load_state_dict(self._gate_state)
            self._gate_state = None
        self._resumed = True


def _innermost_fit_frame() -> int | None:
    """``id`` of the frame of the ``fit`` running this hook (``Trainer.fit`` or Keras's)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit":
            return id(frame)
        frame = frame.f_back
    return None
