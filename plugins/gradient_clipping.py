"""Gradient clipping compiled into the step: Keras's ``global_clipnorm`` / ``clipnorm`` / ``clipvalue``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from corebus import ConfigError, hookimpl
from corebus.kit import optimizer_names


def _dense(gradient: Any) -> Any:
    """Keras's global_clipnorm turns sparse gradients dense (it scales them with a tensor op)."""
    return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


class GradientClipping:
    """Clip gradients before the optimizer applies them, exactly like a Keras optimizer's clipping.

    Give exactly one of:

    - ``global_norm``: scale all gradients together so their global L2 norm is at most this
      (``tf.clip_by_global_norm``; Keras's ``global_clipnorm``);
    - ``norm``: clip each gradient tensor to this L2 norm (``tf.clip_by_norm``; Keras's ``clipnorm``);
    - ``value``: clip every element to ``[-value, value]`` (Keras's ``clipvalue``).

    Sparse gradients (``tf.IndexedSlices``, e.g. of an ``Embedding``) are treated as Keras
    treats them: ``global_norm`` makes them dense (so the optimizer then updates every row, as
    Adam does after Keras's ``global_clipnorm``), ``norm`` and ``value`` keep them sparse;
    ``global_norm`` measures a sparse gradient as Keras does, slice by slice (an index that
    occurs twice in a batch counts twice, so the norm can differ from the dense gradient's).

    The clip runs at trace time inside the compiled step (``Trainer.fit``, or ``model.fit`` with
    ``model.compile(optimizer=callback.wrap_optimizer("adam"))``), so it costs no host work per
    batch. With :class:`GradientAccumulation` it clips the accumulated mean gradient, as Keras
    does with ``gradient_accumulation_steps`` plus a clip option. Do not also set a clip option
    on the optimizer itself: that would clip twice.

    :param optimizers: names of the optimizers to clip in a custom step with several optimizers
        (e.g. ``["generator"]``); ``None`` clips every optimizer.
    :param log_norm: record the global norm of the gradients *before* clipping at every update,
        in a variable; read it with :attr:`last_norm` (one host read, e.g. at epoch end).
    """

    controls = {"grads.clipping"}

    def __init__(
        self,
        global_norm: float | None = None,
        norm: float | None = None,
        value: float | None = None,
        optimizers: Iterable[str] | str | None = None,
        log_norm: bool = False,
    ):
        modes = (("global_norm", global_norm), ("norm", norm), ("value", value))
        given = {mode: threshold for mode, threshold in modes if threshold is not None}
        if len(given) != 1:
            raise ConfigError(
                "GradientClipping needs exactly one of global_norm= (Keras global_clipnorm), "
                f"norm= (clipnorm) or value= (clipvalue); got {', '.join(given) or 'none'}"
            )
        ((self.mode, threshold),) = given.items()
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not (math.isfinite(threshold) and threshold > 0)
        ):
            raise ConfigError(f"GradientClipping {self.mode}={threshold!r} must be a finite number > 0")
        self.threshold = float(threshold)
        self.optimizers = optimizer_names(optimizers, "GradientClipping")
        self.log_norm = bool(log_norm)
        self._norms: dict[str, tf.Variable] = {}
        self._restored: dict[str, float] = {}

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def on_train_begin(self, trainer):
        trainer.check_optimizer_names(self.optimizers, "GradientClipping")

    @hookimpl
    def transform_gradients(self, gradients, optimizer_name):
        if self.optimizers is not None and optimizer_name not in self.optimizers:
            return None
        pre_clip_norm = None
        if self.mode == "global_norm":
            # Keras's norm sums the squares of a sparse gradient's slices as they are (a row
            # looked up twice counts twice), then scales the gradient densified.
            pre_clip_norm = tf.sqrt(
                tf.add_n(
                    [
                        tf.reduce_sum(
                            tf.square(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32))
                        )
                        for g in gradients
                        if g is not None
                    ]
                )
            )
            dense = [_dense(g) for g in gradients]
            clipped, _ = tf.clip_by_global_norm(dense, self.threshold, use_norm=pre_clip_norm)
        elif self.mode == "norm":
            clipped = [None if g is None else tf.clip_by_norm(g, self.threshold) for g in gradients]
        else:
            limit = self.threshold
            clipped = [None if g is None else tf.clip_by_value(g, -limit, limit) for g in gradients]
        if self.log_norm:
            if pre_clip_norm is None:
                pre_clip_norm = tf.linalg.global_norm([g for g in gradients if g is not None])
            self._norm_variable(optimizer_name).assign(tf.cast(pre_clip_norm, tf.float32))
        return list(clipped)

    # ---------------------------------------------------------------- the logged norm

    def _norm_variable(self, optimizer_name: str) -> tf.Variable:
        if optimizer_name not in self._norms:
            # Traced inside the step: lift the variable out, as optimizers create their slots.
            with tf.init_scope():
                self._norms[optimizer_name] = tf.Variable(
                    self._restored.get(optimizer_name, float("nan")),
                    dtype=tf.float32,
                    trainable=False,
                    name=f"grad_norm_{optimizer_name}",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
        return self._norms[optimizer_name]

    @property
    def last_norms(self) -> dict[str, float]:
        """Pre-clip global gradient norm of the last update, per optimizer name (``log_norm=True``)."""
        values = dict(self._restored)
        values.update({name: float(v.numpy()) for name, v in self._norms.items()})
        return {name: v for name, v in values.items() if not math.isnan(v)}  # NaN: no update yet

    @property
    def last_norm(self) -> float | None:
        """Pre-clip global gradient norm of the last update (the default, or first, optimizer)."""
        norms = self.last_norms
        if not norms:
            return None
        return norms.get("default", next(iter(norms.values())))

    # ---------------------------------------------------------------- config and state

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-friendly): ``GradientClipping(**get_config())``."""
        return {self.mode: self.threshold, "optimizers": self.optimizers, "log_norm": self.log_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"last_norms": self.last_norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {str(k): float(v) for k, v in dict(state.get("last_norms", {})).items()}
        for name, variable in self._norms.items():
            if name in self._restored:
                variable.assign(self._restored[name])

    def __repr__(self) -> str:
        args = {k: v for k, v in self.get_config().items() if v not in (None, False)}
        return f"GradientClipping({', '.join(f'{k}={v!r}' for k, v in args.items())})"
