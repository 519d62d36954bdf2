"""TensorBoard's HParams dashboard for corebus runs: ``TensorBoardLogger(hparams=True)``.

At the end of a run the logger writes, into the root of its ``log_dir``, one HParams session
through TensorBoard's own API (``tensorboard.plugins.hparams.api``): the run's parameters
(``trainer.run_params()``, flattened to ``fit.batch_size``, ``optimizer.default.learning_rate``,
``plugins.checkpoint.monitor``...) and, as scalars of that session, the final value of every
epoch metric (``final/<metric>``) and the best value of every metric whose direction is known
(``best/<metric>``: losses minimised, Keras metrics in their own direction, as ``mode="auto"``).
The ``train`` and ``validation`` runs below it belong to the same session, so their
``epoch_*`` curves are the session's metrics too. Runs whose log dirs share a parent compare
side by side in the dashboard (``tensorboard --logdir <parent>``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from corebus import Monitor

log = logging.getLogger("corebus")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested run params as HParams values (bool, number or string), keys joined by ``.``.

    ``None`` is left out (an HParam has no null; the dashboard shows the cell empty); a list
    becomes its JSON text, since a list is no HParam type either.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def epoch_history(trainer: Any) -> tuple[list[int], dict[str, list[Any]]]:
    """The epochs and per-epoch logs of the run: the ``History`` of ``Trainer.fit`` (restored
    on resume, so the whole run), or Keras's ``model.history`` inside ``model.fit``."""
    history = getattr(trainer, "history", None) or getattr(getattr(trainer, "model", None), "history", None)
    if history is None or not isinstance(getattr(history, "history", None), dict):
        return [], {}
    return list(getattr(history, "epoch", []) or []), dict(history.history)


def summary_metrics(trainer: Any) -> tuple[int, dict[str, float]]:
    """``(last epoch, {"final/<metric>": ..., "best/<metric>": ...})`` from the run's history."""
    epochs, history = epoch_history(trainer)
    metrics: dict[str, float] = {}
    for key, values in history.items():
        numbers = [_scalar(v) for v in values]
        numbers = [v for v in numbers if v is not None]
        if not numbers:
            continue
        metrics[f"final/{key}"] = numbers[-1]
        monitor = Monitor(key, "auto", owner="TensorBoardLogger")
        if monitor.try_resolve(getattr(trainer, "model", None)):  # e.g. learning_rate has no "best"
            metrics[f"best/{key}"] = min(numbers) if monitor.minimize else max(numbers)
    return (epochs[-1] if epochs else 0), metrics


def write_hparams(log_dir: str | os.PathLike, trainer: Any) -> bool:
    """Write the run's HParams session and its final / best metrics into ``log_dir``.

    Called once at the end of the run (after the logger's own files are closed); a failure is
    a warning, never the run's failure. Returns whether the session was written.
    """
    try:
        _write(log_dir, trainer)
    except Exception as exc:
        log.warning(
            "TensorBoardLogger: could not write the HParams summary to %s: %s: %s", log_dir, type(exc).__name__, exc
        )
        return False
    return True


def _write(log_dir: str | os.PathLike, trainer: Any) -> None:
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    hparams = flatten_params(trainer.run_params())
    step, metrics = summary_metrics(trainer)
    writer = tf.summary.create_file_writer(os.fspath(log_dir))
    try:
        with writer.as_default():
            hp.hparams(hparams)
            for tag, value in metrics.items():
                tf.summary.scalar(tag, value, step=step)
        writer.flush()
    finally:
        writer.close()


def _scalar(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # a vector metric (F1Score(average=None)) has no one value
        return None
    return number
