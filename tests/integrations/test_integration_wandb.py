"""WandbLogger: train for real in W&B offline mode, then read the run's ``.wandb`` file back.

Nothing is mocked except ``wandb.init`` in the one online-alert test (there is no server here).
"""

import base64
import hashlib
import json
import signal
import sys
import time
from pathlib import Path

import pytest

import corebus
import corebus.app.cli
from corebus import ConfigError, MissingExtraError, PluginError, hookimpl, read_spool
from corebus.integrations.wandb import WandbLogger
from corebus.plugins import BackupAndRestore, EarlyStopping, ModelCheckpoint
from corebus.testing import RecordingPlugin, make_trainer, tiny_data, tiny_model

from wandb_reader import offline_environment, read_run, run_files

BATCH, N = 8, 96  # 12 steps per epoch


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    root = tmp_path / "wb"
    for name, value in offline_environment(tmp_path, wandb_dir=root).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    if "wandb" in sys.modules:  # an earlier test's run (e.g. mode="disabled") left W&B's settings behind
        sys.modules["wandb"].teardown()
    return root


def only_run(root, run_id):
    files = run_files(root, run_id)
    assert len(files) == 1, files
    return read_run(files[0])


def crossed(steps, n, spe):
    """The train-call end steps at which a multiple of n was crossed since the previous call."""
    return [s for s in steps if s // n > (s - spe) // n]


class Notifier:
    """Stands in for a plugin whose config holds a secret (run params must redact it), and
    runtime state (which is no configuration)."""

    def __init__(self, webhook_url="https://hooks.example.com/T000/B000/secret", channel="#training"):
        self.webhook_url = webhook_url
        self.channel = channel
        self.wait, self.best, self.sent = 0, None, []


class StopWith:
    """Raises ``error`` at the first train call of epoch ``epoch`` (or alerts, with ``alert``)."""

    def __init__(self, error=None, epoch=1, alert=False):
        self.error, self.epoch, self.alert = error, epoch, alert

    @hookimpl
    def on_train_batch_end(self, trainer, batch):
        if trainer.epoch == self.epoch and self.error is not None:
            raise self.error

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        if self.alert and epoch == 0:
            trainer.alert("stall", "Training stalled", "no progress for 60 s", "warning")


class Saved:
    """Records every checkpoint announced on the bus."""

    def __init__(self):
        self.files, self.metadata = [], []

    @hookimpl
    def on_checkpoint_saved(self, filepath, step, metadata):
        self.files.append((filepath, step))
        self.metadata.append(metadata)


def test_engine_fit_logs_every_metric_at_its_step_config_summary_and_exit_code(wandb_env):
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=2, name="engine-run", tags=["tiny"])
    recorder = RecordingPlugin(read_logs=True)
    trainer = make_trainer([logger, recorder, Notifier(), EarlyStopping("loss", patience=5)], steps_per_execution=3)
    start = time.perf_counter()
    history = trainer.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x[:32], y[:32]), shuffle=False, verbose=0)
    assert time.perf_counter() - start < 30

    run = only_run(wandb_env, logger.run_id)
    assert (run.run_id, run.project, run.name, run.tags) == (logger.run_id, "corebus", "engine-run", ["tiny"])
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(set(steps))  # W&B's rule: one row per step, steps only grow

    # Batch metrics: every train call that crossed a multiple of 2 (spe=3: each call, 3, 6, 9,
    # ..., where `step % 2 == 0` would have dropped the odd ones), with the values fit saw.
    seen = {
        step: logs for name, kind, step, logs in (e for e in recorder.events if e[0] == "on_log") if kind == "batch"
    }
    assert sorted(seen) == list(range(3, 25, 3))
    expected = crossed(sorted(seen), 2, 3)
    assert sorted(run.metric("batch/loss")) == expected == sorted(run.metric("batch/accuracy"))
    for step in expected:
        assert run.metric("batch/loss")[step] == pytest.approx(seen[step]["loss"], abs=1e-5)
        assert run.metric("batch/accuracy")[step] == pytest.approx(seen[step]["accuracy"], abs=1e-5)
        assert run.metric("batch/learning_rate")[step] == pytest.approx(trainer.lr.value)

    # Epoch metrics join the row of the epoch's last step (merged with that step's batch values).
    for epoch, step in enumerate((12, 24)):
        row = next(r for r in run.history if r["_step"] == step)
        assert row["epoch/epoch"] == epoch and "batch/loss" in row
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert row[f"epoch/{key}"] == pytest.approx(history.history[key][epoch], abs=1e-6)
        assert row["epoch/learning_rate"] == pytest.approx(trainer.lr.value) and row["epoch/steps_per_second"] > 0

    fit = run.config["fit"]
    assert (fit["epochs"], fit["batch_size"], fit["steps_per_execution"], fit["steps"]) == (2, BATCH, 3, 12)
    assert run.config["optimizer"]["default"]["name"] == trainer.optimizer.get_config()["name"]
    assert run.config["optimizer"]["default"]["learning_rate"] == pytest.approx(trainer.lr.value)
    plugins = run.config["plugins"]
    assert plugins["Notifier"] == {"webhook_url": "***", "channel": "#training"}  # no wait, best, sent
    early_stopping = next(c for n, c in plugins.items() if n.startswith("EarlyStopping"))
    assert early_stopping["monitor"] == "loss" and early_stopping["patience"] == 5
    assert not {"wait", "best", "stopped_epoch"} & set(early_stopping)
    wandb_config = next(c for c in plugins.values() if c.get("log_every_n_steps") == 2)
    assert wandb_config["mode"] == "offline" and wandb_config["project"] == "corebus"
    assert "secret" not in str(run.config)

    assert run.summary["epoch/loss"] == pytest.approx(history.history["loss"][-1], abs=1e-6)
    assert run.summary["epoch/val_accuracy"] == pytest.approx(history.history["val_accuracy"][-1], abs=1e-6)
    assert run.summary["_step"] == 24 and run.summary["corebus/status"] == "FINISHED"
    assert run.exit_code == 0
    assert not list(wandb_env.glob("*.spool.jsonl"))  # everything delivered


def test_model_fit_through_keras_callback(wandb_env):
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=4)
    model = tiny_model()
    callback = corebus.KerasCallback([logger])
    model.compile(
        optimizer=callback.wrap_optimizer("sgd"),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=3,
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[callback])

    run = only_run(wandb_env, logger.run_id)
    # Boundary crossing of multiples of 4 with steps 3, 6, 9, ...: 6 (crossed 4), 9 (8), 12,
    # 18 (16), 21 (20), 24; never 3 or 15.
    assert sorted(run.metric("batch/loss")) == crossed(range(3, 25, 3), 4, 3) == [6, 9, 12, 18, 21, 24]
    assert run.metric("epoch/epoch") == {12: 0, 24: 1}
    assert list(run.metric("epoch/loss").values()) == pytest.approx(history.history["loss"], abs=1e-6)
    assert list(run.metric("epoch/accuracy").values()) == pytest.approx(history.history["accuracy"], abs=1e-6)
    assert run.config["fit"]["epochs"] == 2 and run.config["fit"]["steps"] == 12
    assert run.summary["corebus/status"] == "FINISHED" and run.exit_code == 0


def test_a_model_fit_that_raised_is_marked_failed_at_the_next_fit(wandb_env):
    """Keras has no exception hook: the same logger's next fit ends the crashed run honestly."""
    import keras

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                raise RuntimeError("power cut")

    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=1)
    model = tiny_model()
    callback = corebus.KerasCallback([logger])
    model.compile(optimizer=callback.wrap_optimizer("sgd"), loss="sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match="power cut"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback, Crash()])
    crashed = logger.run_id
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])

    run = only_run(wandb_env, crashed)
    assert run.summary["corebus/status"] == "FAILED" and run.exit_code == 1
    assert "without on_train_end" in run.summary["corebus/exception"]
    following = only_run(wandb_env, logger.run_id)
    assert logger.run_id != crashed and following.summary["corebus/status"] == "FINISHED"


@pytest.mark.parametrize(
    "error, exit_code, status",
    [
        (ValueError("boom"), 1, "FAILED"),
        (KeyboardInterrupt(), 255, "KILLED"),
        # A stop signal answered at a step boundary is a stop, not a failure (as MLflow and TensorBoard say).
        (corebus.Preempted(signal.SIGTERM), 255, "KILLED"),
    ],
)
def test_a_run_that_raises_is_marked_failed_or_killed(wandb_env, error, exit_code, status):
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=1)
    trainer = make_trainer([logger, StopWith(error, epoch=1)])
    with pytest.raises(PluginError if isinstance(error, Exception) else type(error)):
        trainer.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    run = only_run(wandb_env, logger.run_id)
    assert run.exit_code == exit_code and run.summary["corebus/status"] == status
    # Everything before the failing call (it raised in on_train_batch_end, before on_log).
    assert sorted(run.metric("batch/loss")) == list(range(1, 13))
    assert run.metric("epoch/epoch") == {12: 0}
    if status == "FAILED":
        assert "ValueError: boom" in run.summary["corebus/exception"]


def test_resumed_run_continues_the_same_run_id(wandb_env, tmp_path):
    x, y = tiny_data(N)
    backup = str(tmp_path / "backup")
    first = WandbLogger(log_every_n_steps=6)
    with pytest.raises(KeyboardInterrupt):  # killed during epoch 1; the snapshot holds epoch 0
        make_trainer([first, BackupAndRestore(backup), StopWith(KeyboardInterrupt(), epoch=1)]).fit(
            x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0
        )
    assert first.state_dict() == {"run_id": first.run_id, "best": None}  # no checkpoint, no best

    second = WandbLogger(log_every_n_steps=6)
    make_trainer([second, BackupAndRestore(backup)]).fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    assert second.run_id == first.run_id  # restored from the snapshot's plugin state

    killed, resumed = (read_run(path) for path in run_files(wandb_env, first.run_id))
    assert killed.run_id == resumed.run_id == first.run_id
    assert killed.exit_code == 255 and resumed.exit_code == 0
    assert killed.metric("epoch/epoch") == {12: 0}
    assert sorted(killed.metric("batch/loss")) == [6, 12]
    # The resumed process continues at step 12 (epoch 1), on the same step axis.
    assert resumed.summary["corebus/resumed_at_step"] == 12
    assert resumed.metric("epoch/epoch") == {24: 1, 36: 2}
    assert sorted(resumed.metric("batch/loss")) == [18, 24, 30, 36]

    # A new fit of the same instance starts a new run; load_state_dict alone resumes one.
    fresh = WandbLogger()
    fresh.load_state_dict(second.state_dict())
    assert fresh.state_dict() == {"run_id": first.run_id, "best": None}


def test_checkpoints_become_model_artifacts(wandb_env, tmp_path):
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=None, log_checkpoints="all")
    # save_top_k=1 deletes each file at the next save, 3 steps later: usually before the worker
    # uploads it, so this fails unless the logger keeps the file (a hard link) until then.
    checkpoint = ModelCheckpoint(
        str(tmp_path / "ckpt" / "{step:03d}.weights.h5"),
        monitor="loss",
        save_weights_only=True,
        save_top_k=1,
        save_freq=3,
    )
    saved = Saved()
    make_trainer([logger, checkpoint, saved]).fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    run = only_run(wandb_env, logger.run_id)
    saves = [step for _, step in saved.files]
    assert len(saves) > 3 and all(not Path(path).exists() for path, _ in saved.files[:-1])
    assert [(a.name, a.type) for a in run.artifacts] == [(f"run_{logger.run_id}_model", "model")] * len(saves)
    # Each save entered the top 1, so each was the best so far (W&B moves both aliases along).
    assert [set(a.aliases) for a in run.artifacts] == [{"latest", "best", f"step_{s}"} for s in saves]
    assert [[c.path for c in a.manifest.contents] for a in run.artifacts] == [[f"{s:03d}.weights.h5"] for s in saves]
    assert [json.loads(a.metadata)["step"] for a in run.artifacts] == saves
    # Only the last file is left on disk; its upload is that file, byte for byte.
    (kept,) = (tmp_path / "ckpt").iterdir()
    assert str(kept) == saved.files[-1][0]
    digest = base64.b64encode(hashlib.md5(kept.read_bytes()).digest()).decode()
    assert run.artifacts[-1].manifest.contents[0].digest == digest
    assert run.metric("batch/loss") == {} and run.metric("epoch/epoch") == {12: 0, 24: 1}  # epochs only
    assert not (wandb_env / f"wandb-{logger.run_id}.staging").exists()


def test_alerts_offline_are_kept_in_the_summary(wandb_env):
    x, y = tiny_data(N)
    logger = WandbLogger()
    make_trainer([logger, StopWith(alert=True)]).fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    run = only_run(wandb_env, logger.run_id)
    (alert,) = run.summary["alerts"]
    assert {k: alert[k] for k in ("kind", "title", "text", "level", "step", "epoch")} == {
        "kind": "stall",
        "title": "Training stalled",
        "text": "no progress for 60 s",
        "level": "warning",
        "step": 12,
        "epoch": 0,
    }
    assert run.alerts == []  # offline: no alert record that would fire, stale, at sync time


def test_alerts_online_call_run_alert(wandb_env, mocker):
    # The one mock of this file: there is no W&B server here.
    import wandb

    fake_run = mocker.MagicMock()
    fake_run.summary = {}
    init = mocker.patch.object(wandb, "init", return_value=fake_run)
    x, y = tiny_data(N)
    logger = WandbLogger(mode="online", entity="team", log_every_n_steps=12, isolate_sdk=False)  # patched here
    make_trainer([logger, StopWith(alert=True)]).fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    init.assert_called_once()
    kwargs = init.call_args.kwargs
    assert {k: kwargs[k] for k in ("mode", "entity", "id", "resume", "reinit")} == {
        "mode": "online",
        "entity": "team",
        "id": logger.run_id,
        "resume": "allow",
        "reinit": "create_new",
    }
    fake_run.alert.assert_called_once_with(title="Training stalled", text="no progress for 60 s", level="WARN")
    assert fake_run.summary["alerts"][0]["kind"] == "stall"
    assert [c.kwargs["step"] for c in fake_run.log.call_args_list] == [12, 12]  # batch, then epoch
    fake_run.finish.assert_called_once_with(exit_code=0)


def test_undeliverable_records_are_spooled_and_corebus_sync_replays_them(wandb_env, capsys):
    # A real delivery failure, no server or mock needed: W&B cannot create <dir>/wandb/.
    wandb_env.mkdir(parents=True)
    (wandb_env / "wandb").write_text("")
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=4, shutdown_timeout=1)
    start = time.perf_counter()
    make_trainer([logger]).fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert time.perf_counter() - start < 15  # bounded shutdown, training never waited

    spool = wandb_env / f"wandb-{logger.run_id}.spool.jsonl"
    header, records = read_spool(spool)
    assert header["plugin"] == "wandb" and header["config"]["run_id"] == logger.run_id
    assert [r["type"] for r in records] == ["config"] + ["log"] * 8 + ["finish"]  # all of them, in order
    assert [r["step"] for r in records if r["type"] == "log"] == [4, 8, 12, 12, 16, 20, 24, 24]

    (wandb_env / "wandb").unlink()  # the backend is back
    assert corebus.app.cli.main(["sync", str(wandb_env)]) == 0
    assert f"replayed {len(records)} of {len(records)} records through wandb" in capsys.readouterr().out
    run = only_run(wandb_env, logger.run_id)
    assert sorted(run.metric("batch/loss")) == [4, 8, 12, 16, 20, 24]
    assert run.metric("epoch/epoch") == {12: 0, 24: 1}
    assert run.config["fit"]["epochs"] == 2
    assert run.exit_code == 0 and run.summary["corebus/status"] == "FINISHED"
    assert not spool.exists()


def test_bad_configuration_fails_before_training(wandb_env, tmp_path):
    with pytest.raises(ConfigError, match="mode='live'.*online, offline, disabled"):
        WandbLogger(mode="live")
    with pytest.raises(ConfigError, match="log_every_n_steps=0"):
        WandbLogger(log_every_n_steps=0)
    (tmp_path / "file").write_text("")
    logger = WandbLogger(dir=tmp_path / "file" / "runs")
    trainer = make_trainer([logger])
    with pytest.raises(ConfigError, match="WandbLogger: cannot write"):
        trainer.fit(*tiny_data(N), batch_size=BATCH, epochs=1, verbose=0)
    assert trainer.global_step == 0


def test_disabled_mode_trains_and_writes_nothing(wandb_env):
    logger = WandbLogger(mode="disabled", log_every_n_steps=1)
    history = make_trainer([logger]).fit(*tiny_data(N), batch_size=BATCH, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1
    assert not run_files(wandb_env) and not list(wandb_env.glob("*.spool.jsonl"))


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtraError, match=r'pip install "corebus\[wandb\]"'):
        WandbLogger()


def test_reader_reassembles_records_spanning_blocks(wandb_env):
    # The reader under every test above: a record larger than a 32 KiB block comes back whole.
    import wandb

    run = wandb.init(project="reader", id="bigrecord", dir=str(wandb_env), reinit="create_new")
    blob = "".join(chr(ord("a") + i % 26) for i in range(100_000))
    run.config.update({"blob": blob})
    for step in range(1, 2001):
        run.log({"x": step * 0.5}, step=step)
    run.finish(exit_code=3)
    (path,) = run_files(wandb_env, "bigrecord")
    assert path.stat().st_size > 3 * 32768
    back = read_run(path)
    assert back.config["blob"] == blob and back.exit_code == 3
    assert back.metric("x") == {step: step * 0.5 for step in range(1, 2001)}


class GiveWandbTime:
    """W&B's service collects the environment record in the background once the run started,
    and drops it when the run finishes first: wait for the run to be up (its first records
    delivered, however slow the machine), then a few seconds more."""

    def __init__(self, logger):
        self.logger = logger

    @hookimpl
    def on_epoch_end(self):
        deadline = time.monotonic() + 60
        while self.logger._outbox.stats["sent"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)


def environment_of(root, run_id, wait=10.0):
    """The run, once W&B's service has written its environment record (collected in the
    background while the run starts: it may land after the exit record)."""
    deadline = time.monotonic() + wait
    while True:
        run = only_run(root, run_id)
        if (run.environment is not None and run.environment.program) or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_the_sdk_runs_in_a_child_process_by_default(wandb_env, mocker, monkeypatch):
    import wandb

    import __main__

    for name in ("WANDB__DISABLE_META", "WANDB__DISABLE_MACHINE_INFO"):  # the environment record checked below
        monkeypatch.delenv(name)
    # As if launched as `python train.py` (under pytest, W&B names no program at all).
    monkeypatch.chdir(wandb_env.parent)
    (wandb_env.parent / "train.py").write_text("# the training script\n")
    monkeypatch.setattr(__main__, "__spec__", None)
    monkeypatch.setattr(__main__, "__file__", str(wandb_env.parent / "train.py"), raising=False)  # none under xdist

    init = mocker.patch.object(wandb, "init", side_effect=AssertionError("W&B ran in the training process"))
    logger = WandbLogger(log_every_n_steps=4)
    assert logger.isolate_sdk and not WandbLogger(mode="disabled").isolate_sdk
    make_trainer([logger, GiveWandbTime(logger)]).fit(
        *tiny_data(N), batch_size=BATCH, epochs=1, shuffle=False, verbose=0
    )
    init.assert_not_called()
    run = environment_of(wandb_env, logger.run_id)
    assert sorted(run.metric("batch/loss")) == [4, 8, 12]
    assert run.exit_code == 0 and run.summary["corebus/status"] == "FINISHED"
    # The run names the training program, as W&B in the training process would, not the child
    # (which, left alone, says "<python with no main file>").
    assert run.environment.program == "train.py" or run.environment.program.endswith("/train.py")
    assert run.environment.executable == sys.executable


class SlowSteps:
    """Makes each train call take ``seconds`` longer, and notes when each step and epoch ended."""

    def __init__(self, seconds):
        self.seconds, self.step_times, self.epoch_times = seconds, {}, {}
        self.first_batch = None

    @hookimpl
    def on_train_batch_begin(self):
        self.first_batch = self.first_batch or time.time()

    @hookimpl
    def on_train_batch_end(self):
        time.sleep(self.seconds)

    @hookimpl
    def on_log_steps(self, records):
        self.step_times.update({record.step: record.time for record in records})

    @hookimpl
    def on_epoch_end(self, epoch):
        self.epoch_times[epoch] = time.time()


def test_rows_carry_their_steps_wall_time_and_the_runtime_is_the_fits(wandb_env):
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=1)
    slow = SlowSteps(0.1)
    began = time.time()
    make_trainer([logger, slow]).fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    ended = time.time()

    run = only_run(wandb_env, logger.run_id)
    stamps = {row["_step"]: row["_timestamp"] for row in run.history}
    assert sorted(stamps) == sorted(slow.step_times) == list(range(1, 37))
    for step, stamp in stamps.items():
        if step % 12:  # a step's own row: the time its call ended (to the millisecond)
            assert stamp == pytest.approx(slow.step_times[step], abs=2e-3)
        else:  # the epoch's values joined the row of its last step: the epoch's end
            assert stamp == pytest.approx(slow.epoch_times[step // 12 - 1], abs=0.5)
    # Spread over the fit (36 calls of >= 0.1 s), not bunched at delivery.
    assert stamps[35] - stamps[1] >= 3.4
    # The W&B run starts with the fit, before its first batch (fit waited for it), and
    # finishes with it: W&B counts its runtime (whole seconds) from wandb.init to finish.
    assert began <= run.start_time <= slow.first_batch
    assert slow.epoch_times[2] - run.start_time - 1 <= run.runtime <= ended - run.start_time + 1


def test_kept_checkpoints_only_with_latest_and_best_aliases_and_the_best_in_the_summary(wandb_env, tmp_path):
    x, y = tiny_data(N)
    logger = WandbLogger(log_every_n_steps=None)  # log_checkpoints="kept" by default
    checkpoint = ModelCheckpoint(
        str(tmp_path / "ckpt" / "{step:03d}.weights.h5"),
        monitor="loss",
        save_weights_only=True,
        save_top_k=2,
        save_freq=2,
    )
    saved = Saved()
    make_trainer([logger, checkpoint, saved]).fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    run = only_run(wandb_env, logger.run_id)
    kept = sorted(tmp_path.joinpath("ckpt").iterdir())
    assert len(saved.files) > 4 and len(kept) == 2  # many saves, two kept on disk
    # W&B holds the two kept files, oldest first, not one version per save.
    assert [[c.path for c in a.manifest.contents] for a in run.artifacts] == [[p.name] for p in kept]
    steps = [json.loads(a.metadata)["step"] for a in run.artifacts]
    # W&B's log_artifact gives each version it logs "latest" (the server moves it along).
    assert [set(a.aliases) - {"best"} for a in run.artifacts] == [{"latest", f"step_{s}"} for s in steps]
    values = {step: meta["value"] for (_, step), meta in zip(saved.files, saved.metadata)}
    best_step = min(values, key=values.get)  # the loss is minimised
    assert [("best" in a.aliases) for a in run.artifacts] == [s == best_step for s in steps]
    for artifact, path in zip(run.artifacts, kept):
        digest = base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()
        assert artifact.manifest.contents[0].digest == digest
    # The summary: the best monitored value of the run and where it was.
    best_meta = saved.metadata[[s for _, s in saved.files].index(best_step)]
    assert run.summary["best/loss"] == pytest.approx(values[best_step])
    assert (run.summary["best/epoch"], run.summary["best/step"]) == (best_meta["epoch"], best_step)


def test_log_checkpoints_false_uploads_nothing_and_bad_values_are_refused(wandb_env, tmp_path):
    with pytest.raises(ConfigError, match=r"log_checkpoints='some'.*\"kept\" \(or True\), \"all\" or False"):
        WandbLogger(log_checkpoints="some")
    assert WandbLogger(log_checkpoints=True).log_checkpoints == "kept"
    logger = WandbLogger(log_every_n_steps=None, log_checkpoints=False)
    checkpoint = ModelCheckpoint(str(tmp_path / "ckpt" / "{step:03d}.weights.h5"), save_weights_only=True, save_freq=6)
    make_trainer([logger, checkpoint]).fit(*tiny_data(N), batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    run = only_run(wandb_env, logger.run_id)
    assert run.artifacts == [] and run.exit_code == 0


class KillAt:
    """Ctrl-C after the train call that reaches global step ``step``."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_a_resumed_run_continues_its_wandb_run_without_repeating_a_step(wandb_env, tmp_path):
    x, y = tiny_data(N)
    backup = str(tmp_path / "backup")

    def plugins(logger, *more):
        checkpoint = ModelCheckpoint(
            str(tmp_path / "ckpt" / "{epoch:02d}.weights.h5"),
            monitor="loss",
            save_weights_only=True,
            save_best_only=True,
        )
        return [logger, checkpoint, BackupAndRestore(backup), *more]

    first = WandbLogger(log_every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):  # the snapshot holds step 12; steps 13-18 were logged after it
        make_trainer(plugins(first, KillAt(20))).fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    second = WandbLogger(log_every_n_steps=2)
    make_trainer(plugins(second)).fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    killed, resumed = (read_run(path) for path in run_files(wandb_env, first.run_id))
    assert second.run_id == first.run_id == killed.run_id == resumed.run_id
    assert sorted(killed.metric("batch/loss")) == list(range(2, 19, 2))  # step 20 raised before its record
    # The resumed process trained steps 13-36 again, and logs only what W&B does not hold.
    assert resumed.summary["corebus/resumed_at_step"] == 12
    assert sorted(resumed.metric("batch/loss")) == list(range(20, 37, 2))
    assert resumed.metric("epoch/epoch") == {24: 1, 36: 2}
    # The best checkpoint of the whole run (epoch 0's came before the kill) is in the summary.
    assert resumed.summary["best/epoch"] in (0, 1, 2) and resumed.summary["best/loss"] == pytest.approx(
        min([*killed.metric("epoch/loss").values(), *resumed.metric("epoch/loss").values()]), rel=1e-6
    )
    assert not (wandb_env / f"wandb-{first.run_id}.step").exists()  # finished: nothing left to resume
    # A snapshot's run id names files here: anything but a W&B id is refused.
    with pytest.raises(ValueError, match="no W&B run id"):
        WandbLogger().load_state_dict({"run_id": "../../etc"})


@pytest.mark.parametrize("disabled", [False, True])
def test_system_metrics_are_on_by_default_and_wandbs_setting_switches_them_off(wandb_env, monkeypatch, disabled):
    for name in ("WANDB__DISABLE_STATS", "WANDB__DISABLE_MACHINE_INFO"):  # the suite's; not W&B's defaults
        monkeypatch.delenv(name)
    if disabled:
        monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB__STATS_SAMPLING_INTERVAL", "0.2")
    logger = WandbLogger(log_every_n_steps=None)
    make_trainer([logger, SlowSteps(0.1)]).fit(*tiny_data(N), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    run = only_run(wandb_env, logger.run_id)
    assert run.exit_code == 0
    if disabled:
        assert run.stats == []
    else:  # samples of this (the training) process, though the SDK lives in a child
        assert run.stats and any(key.startswith("proc.memory") for sample in run.stats for key in sample)
