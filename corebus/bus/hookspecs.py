"""Every hook corebus emits, in one place.

Names follow the Keras callback vocabulary, so a Keras user reads a corebus plugin cold:
``on_train_begin``, ``on_epoch_end(epoch, logs)``, ``on_train_batch_end(batch, logs)``.
What Keras lacks (gradient pipeline, plugin-state checkpoints, the shared logging event,
alerts, exceptions) follows the same ``on_*`` / verb style.

Every hook receives ``trainer`` as a keyword: the :class:`corebus.Trainer` running the loop,
or, inside ``model.fit``, the :class:`corebus.KerasCallback`'s run context, which exposes the
same attributes (``model``, ``optimizer``, ``lr``, ``global_step``, ``epoch``,
``stop_training``, ``params``, ``alert()``). pluggy lets an implementation accept any subset of
a hook's arguments, so write only the ones you use::

    from corebus import hookimpl

    class PrintLoss:
        @hookimpl
        def on_epoch_end(self, epoch, logs):
            print(epoch, logs["loss"])

Order of one ``fit`` (the same in ``Trainer.fit`` and in ``model.fit`` with the adapter)::

    on_train_begin
      on_epoch_begin(0)
        on_train_batch_begin(0) on_train_batch_end(0) on_log(batch) ...
        on_test_begin on_test_batch_begin(0) on_test_batch_end(0) ... on_test_end
      on_epoch_end(0) on_log(epoch)
      ...
    on_train_end            (or on_exception, then the exception propagates)
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("corebus")

__all__ = [
    # run
    "on_train_begin",
    "on_train_end",
    "on_exception",
    # epoch
    "on_epoch_begin",
    "on_epoch_end",
    # batch
    "on_train_batch_begin",
    "on_train_batch_end",
    # evaluation and prediction
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
    # gradients
    "transform_gradients",
    "gradient_accumulation_steps",
    # checkpoint
    "on_checkpoint_saved",
    "on_state_restored",
    # logging
    "on_log",
    "on_log_steps",
    # alerts
    "on_alert",
]


# -------------------------------------------------------------------------
# run
# -------------------------------------------------------------------------


@hookspec
def on_train_begin(trainer, logs):
    """Called once at the start of ``fit``, before the first epoch begins.

    Plugins validate their configuration against the run here (monitored metric names,
    output directories) so bad input fails before any step runs.

    :param trainer: the running trainer (or the adapter's run context inside ``model.fit``).
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_train_end(trainer, logs):
    """Called once when ``fit`` finishes normally, after the last ``on_epoch_end``.

    Also called when a plugin stopped training early. Not called when ``fit`` raises
    (see :func:`on_exception`).

    :param trainer: the running trainer.
    :param logs: the last epoch's logs (train and validation metrics), or ``None`` when no
        epoch ran.
    """


@hookspec
def on_exception(trainer, exception):
    """Called when ``fit`` raises, before the exception propagates to the caller.

    Lets loggers mark their run FAILED (or KILLED for ``KeyboardInterrupt``) and writers
    flush. Exceptions raised here are logged and swallowed so the original one propagates.

    :param trainer: the running trainer.
    :param exception: the exception that ended the run (``BaseException`` subclasses
        included, e.g. ``KeyboardInterrupt``).
    """


# -------------------------------------------------------------------------
# epoch
# -------------------------------------------------------------------------


@hookspec
def on_epoch_begin(trainer, epoch, logs):
    """Called at the start of every epoch, after the metrics were reset.

    :param trainer: the running trainer.
    :param epoch: zero-based epoch index (counts from ``initial_epoch``).
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_epoch_end(trainer, epoch, logs):
    """Called at the end of every epoch, after validation ran.

    ``logs`` holds plain Python floats: the epoch's train metrics (``loss``, ``accuracy``, ...)
    and, when validation ran, the same names prefixed ``val_``. Setting
    ``trainer.stop_training = True`` here ends ``fit`` after this epoch.

    :param trainer: the running trainer.
    :param epoch: zero-based epoch index.
    :param logs: the epoch's metrics, a mutable ``dict[str, float]``.
    """


# -------------------------------------------------------------------------
# batch
# -------------------------------------------------------------------------


@hookspec
def on_train_batch_begin(trainer, batch, logs):
    """Called before each compiled train call.

    With ``steps_per_execution=N`` one compiled call runs N steps, so this fires once per N
    batches with the index of the first one, as in Keras.

    :param trainer: the running trainer; ``trainer.global_step`` is the number of optimizer
        updates done before this call.
    :param batch: zero-based index, within the epoch, of the first batch of this call.
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_train_batch_end(trainer, batch, logs):
    """Called after each compiled train call.

    ``logs`` is a lazy read-only mapping of the step's outputs (the loss and metric running
    means, as in Keras). Values stay on the device until a plugin reads one; the first read
    fetches all of them in one host transfer. A step whose logs nobody reads never syncs.

    :param trainer: the running trainer; ``trainer.global_step`` counts the updates done,
        including this call's.
    :param batch: zero-based index, within the epoch, of the last batch of this call.
    :param logs: a :class:`corebus.LazyLogs` mapping of metric name to value.
    """


# -------------------------------------------------------------------------
# evaluation and prediction
# -------------------------------------------------------------------------


@hookspec
def on_test_begin(trainer, logs):
    """Called at the start of ``evaluate`` and of the validation pass inside ``fit``.

    :param trainer: the running trainer.
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_test_end(trainer, logs):
    """Called at the end of ``evaluate`` and of the validation pass inside ``fit``.

    :param trainer: the running trainer.
    :param logs: the evaluation metrics as plain floats (unprefixed: ``loss``, not
        ``val_loss``).
    """


@hookspec
def on_test_batch_begin(trainer, batch, logs):
    """Called before each compiled evaluation call.

    :param trainer: the running trainer.
    :param batch: zero-based index of the first batch of this call.
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_test_batch_end(trainer, batch, logs):
    """Called after each compiled evaluation call.

    :param trainer: the running trainer.
    :param batch: zero-based index of the last batch of this call.
    :param logs: a lazy mapping of the running evaluation metrics.
    """


@hookspec
def on_predict_begin(trainer, logs):
    """Called at the start of ``predict``.

    :param trainer: the running trainer.
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_predict_end(trainer, logs):
    """Called at the end of ``predict``, before the outputs are returned.

    :param trainer: the running trainer.
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_predict_batch_begin(trainer, batch, logs):
    """Called before each compiled predict call.

    :param trainer: the running trainer.
    :param batch: zero-based index of the first batch of this call.
    :param logs: an empty dict, kept for Keras symmetry.
    """


@hookspec
def on_predict_batch_end(trainer, batch, logs):
    """Called after each compiled predict call.

    :param trainer: the running trainer.
    :param batch: zero-based index of the last batch of this call.
    :param logs: ``{"outputs": ...}``, the model outputs of this call (as in Keras).
    """


# -------------------------------------------------------------------------
# gradients
# -------------------------------------------------------------------------


@hookspec
def transform_gradients(trainer, gradients, variables, optimizer_name):
    """Transform gradients inside the compiled step, before the optimizer applies them.

    Evaluated at **trace time**: the implementation receives symbolic tensors and must build
    TensorFlow ops (``tf.clip_by_global_norm``, ...), not call ``.numpy()``. The result is
    compiled into the step, so it costs nothing on the host per batch. Implementations are
    chained in hook order: each receives the previous one's output. Return ``None`` to leave
    the gradients unchanged.

    Inside ``model.fit`` this hook runs through :func:`corebus.wrap_optimizer`.

    :param trainer: the running trainer (read configuration from it, not tensors).
    :param gradients: list of gradient tensors (``None`` for variables with no gradient).
    :param variables: the list of variables the gradients belong to, same order.
    :param optimizer_name: which optimizer will apply them (``"default"`` for the single
        optimizer of a standard step; the key of the ``optimizer`` dict for custom steps).
    :return: a new list of gradients of the same length, or ``None``.
    """


@hookspec(firstresult=True)
def gradient_accumulation_steps(trainer, optimizer_name):
    """How many micro-batches the named optimizer accumulates before one update.

    Asked once per run (and at trace time). The first non-``None`` answer wins. With N > 1 the
    pipeline sums gradients into accumulators and, every N-th micro-batch, hands their mean to
    :func:`transform_gradients` and then to the optimizer, so clipping sees the accumulated
    gradient (as with Keras's ``gradient_accumulation_steps`` + ``global_clipnorm``), and the
    optimizer's step counter, LR schedules and ``trainer.global_step`` count updates, not
    micro-batches.

    :param trainer: the running trainer.
    :param optimizer_name: which optimizer is asking (``"default"`` for a standard step).
    :return: an integer >= 1, or ``None`` for no opinion.
    """


# -------------------------------------------------------------------------
# checkpoint
# -------------------------------------------------------------------------


@hookspec
def on_checkpoint_saved(trainer, filepath, step, metadata):
    """Called after a checkpoint or run snapshot was written completely (renamed into place).

    Loggers subscribe to upload it as an artifact.

    :param trainer: the running trainer.
    :param filepath: path of the file or directory written.
    :param step: the global step the checkpoint holds.
    :param metadata: a dict describing it (``kind``, ``monitor``, ``value``, ``epoch``...).
    """


@hookspec
def on_state_restored(trainer, step, state):
    """Called after a run snapshot was restored, before training continues.

    Plugin state itself is restored through each plugin's ``load_state_dict``; this hook is
    for plugins that must react to the resume (e.g. a logger continuing the same run id).

    :param trainer: the running trainer.
    :param step: the global step training resumes from.
    :param state: the restored run state (``epoch``, ``global_step``, plugin states).
    """


# -------------------------------------------------------------------------
# logging
# -------------------------------------------------------------------------


@hookspec
def on_log(trainer, kind, step, logs):
    """One event every logger subscribes to, so no logger re-implements when to log.

    Fired after every train call (``kind="batch"``; ``logs`` lazy, read it only when your
    :class:`corebus.Cadence` says so) and at every epoch end (``kind="epoch"``; plain floats
    including ``val_*``, ``learning_rate`` (``learning_rate/<name>`` per optimizer when there
    are several) and ``steps_per_second``).

    A subscriber that uses batch records only at its cadence declares it as the attribute
    ``batch_log_cadence`` (a :class:`corebus.Cadence`; ``None``: epoch records only). When every
    subscriber declares one, the batch call is skipped after train calls where none is due: no
    dispatch per step, and in ``model.fit`` no learning-rate read. The call still goes to every
    subscriber when any is due, so each checks its own cadence; one without the attribute gets
    every call. A logger that sends in batches takes its batch records through
    :func:`on_log_steps` instead, many at a time.

    Batch values are the step's own values, not Keras's running means: the batch loss as the
    compiled step computed it, and mean-type metrics of the call derived on first read from two
    consecutive running means (custom steps report their own values; with a ``tf.data`` input,
    sample weights, or inside ``model.fit``, metrics other than the loss are running means). They
    include ``learning_rate`` (``learning_rate/<name>`` per optimizer when there are several),
    the rate after the call's last update, and, when a plugin declares
    ``gradient_taps = {"norm"}``, ``grad_norm`` (``grad_norm/<name>``), the global norm of the
    update's gradients before clipping. They share the host fetch of ``on_train_batch_end``'s
    logs.

    :param trainer: the running trainer.
    :param kind: ``"batch"`` or ``"epoch"``.
    :param step: the global optimizer step the values belong to (the canonical x axis).
    :param logs: mapping of metric name to value.
    """


@hookspec
def on_log_steps(trainer, records):
    """Batch ``on_log`` records of many train calls at once, for loggers that send in batches.

    A plugin implementing this hook gets its batch records here instead of through ``on_log``
    (its ``on_log`` then sees epoch records only). The engine keeps each train call's record
    (a :class:`corebus.LoggedStep`: ``step``, ``previous_step``, ``time``, ``logs``) and hands
    them over every ``corebus.LOGGER_FLUSH_SECONDS`` (the first at once), every 1,000 records,
    and always before the epoch's ``on_log``, ``on_train_end`` and ``on_exception``. So the
    training loop runs no plugin code per step: a batch record costs a tuple, and its Python
    work runs later, many steps in a row, where it runs faster.

    ``records`` holds, oldest first, every train call at which some subscriber's
    ``batch_log_cadence`` is due (every call when one subscriber declares none); a subscriber
    picks its own with ``cadence.picks(records)``. ``logs`` are the values ``on_log`` would
    have had (lazy, read at first use); ``time`` is the wall-clock time (``time.time()``)
    the call ended, for the backend's timestamp.

    :param trainer: the running trainer.
    :param records: the held records, oldest first.
    """


# -------------------------------------------------------------------------
# alerts
# -------------------------------------------------------------------------


@hookspec
def on_alert(trainer, alert):
    """An alert was raised (stall, non-finite loss, plateau, divergence...).

    Notification channels subscribe here. Raised with ``trainer.alert(...)`` by any plugin,
    from any thread (the stall watchdog raises its alerts from its own): the run's
    :class:`corebus.AlertGate` drops duplicates and repeats within the cooldown of their kind,
    then calls this hook for one alert at a time. Delivery must not block: notifiers hand the
    alert to their own sender thread (a :class:`corebus.LogSink`).

    :param trainer: the running trainer.
    :param alert: a :class:`corebus.Alert` (level, kind, title, text, step, rank, host).
    """
