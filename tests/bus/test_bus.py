"""The bus: registration, errors before training, order, ownership, error policy, hot path."""

import logging

import pytest

from corebus import ConfigError, LazyLogs, PluginBus, PluginError, hookimpl, installed_plugins
from corebus.bus.registry import resolve_all


class Calls:
    def __init__(self, log, tag, **attrs):
        self.log, self.tag = log, tag
        self.__dict__.update(attrs)

    @hookimpl
    def on_epoch_end(self, epoch):
        self.log.append(self.tag)


class Failing:
    def __init__(self, policy="raise", max_failures=3):
        self.error_policy = policy
        self.max_failures = max_failures
        self.calls = 0

    @hookimpl
    def on_epoch_end(self, epoch):
        self.calls += 1
        raise ValueError(f"boom at {epoch}")


def test_class_instead_of_instance_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"forget the parentheses"):
        resolve_all([Failing])


def test_unknown_name_lists_installed_plugins():
    with pytest.raises(ConfigError) as err:
        resolve_all(["early_stoping_typo"])
    message = str(err.value)
    assert "early_stoping_typo" in message
    for info in installed_plugins():
        assert info.name in message


def test_bad_params_name_the_accepted_signature():
    with pytest.raises(ConfigError, match=r"progress.*bad params.*Accepted: ProgressBar\(interval"):
        resolve_all([{"name": "progress", "intervall": 3}])


def test_mapping_without_name():
    with pytest.raises(ConfigError, match="no 'name'"):
        resolve_all([{"interval": 3}])


def test_names_and_mappings_resolve():
    named = resolve_all(["history", {"name": "progress", "interval": 0.5}])
    assert [n for n, _ in named] == ["history", "progress"]
    assert named[1][1].interval == 0.5


def test_config_files_toml_and_yaml(tmp_path):
    toml = tmp_path / "plugins.toml"
    toml.write_text("[plugins.progress]\ninterval = 0.25\n[plugins.history]\n")
    yaml = tmp_path / "plugins.yaml"
    yaml.write_text("plugins:\n  - name: progress\n    interval: 0.5\n  - history\n")
    assert [(n, getattr(p, "interval", None)) for n, p in resolve_all(str(toml))] == [
        ("progress", 0.25),
        ("history", None),
    ]
    assert [(n, getattr(p, "interval", None)) for n, p in resolve_all(yaml)] == [("progress", 0.5), ("history", None)]


def test_config_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins\nprogress = ")
    with pytest.raises(ConfigError, match=r"bad.toml: does not parse"):
        resolve_all(str(bad))


def test_list_order_is_call_order():
    log = []
    bus = PluginBus([("a", Calls(log, "a")), ("b", Calls(log, "b")), ("c", Calls(log, "c"))])
    bus.call("on_epoch_end", trainer=None, epoch=0, logs={})
    assert log == ["a", "b", "c"]


def test_declared_constraints_reorder():
    log = []
    first = Calls(log, "writer", runs_after=("changer",))
    bus = PluginBus([("writer", first), ("changer", Calls(log, "changer"))])
    bus.call("on_epoch_end", trainer=None, epoch=0, logs={})
    assert log == ["changer", "writer"]
    assert "changer -> writer" in bus.describe().splitlines()[1]


def test_constraint_cycle_is_an_error():
    with pytest.raises(ConfigError, match="cycle"):
        PluginBus([("a", Calls([], "a", runs_after=("b",))), ("b", Calls([], "b", runs_after=("a",)))])


def test_tryfirst_beats_list_order():
    log = []

    class Early:
        @hookimpl(tryfirst=True)
        def on_epoch_end(self):
            log.append("early")

    bus = PluginBus([("a", Calls(log, "a")), ("early", Early())])
    bus.call("on_epoch_end", trainer=None, epoch=0, logs={})
    assert log == ["early", "a"]
    assert "early [tryfirst] -> a" in bus.describe()


def test_two_owners_of_the_same_control_are_rejected():
    with pytest.raises(ConfigError, match=r"'cosine' and 'warmup' both control 'lr.schedule'"):
        PluginBus(
            [("cosine", Calls([], "x", controls={"lr.schedule"})), ("warmup", Calls([], "y", controls={"lr.schedule"}))]
        )
    # a schedule and a multiplier compose
    PluginBus(
        [("cosine", Calls([], "x", controls={"lr.schedule"})), ("plateau", Calls([], "y", controls={"lr.multiplier"}))]
    )


def test_raise_policy_names_plugin_and_hook():
    bus = PluginBus([("flaky", Failing())])
    with pytest.raises(PluginError, match=r"plugin 'flaky' failed in on_epoch_end: ValueError: boom at 4") as err:
        bus.call("on_epoch_end", trainer=None, epoch=4, logs={})
    assert isinstance(err.value.__cause__, ValueError)


def test_warn_policy_logs_and_continues(caplog):
    log = []
    bus = PluginBus([("flaky", Failing("warn")), ("next", Calls(log, "next"))])
    with caplog.at_level(logging.WARNING, logger="corebus"):
        bus.call("on_epoch_end", trainer=None, epoch=1, logs={})
    assert log == ["next"]
    assert "plugin 'flaky' failed in on_epoch_end: ValueError: boom at 1" in caplog.text


def test_disable_policy_stops_calling_after_k_failures():
    failing = Failing("disable", max_failures=2)
    bus = PluginBus([("flaky", failing)])
    for epoch in range(5):
        bus.call("on_epoch_end", trainer=None, epoch=epoch, logs={})
    assert failing.calls == 2 and "flaky" in bus.disabled


def test_unknown_error_policy():
    with pytest.raises(ConfigError, match="error_policy"):
        PluginBus([("x", Failing("ignore"))])


def test_hooks_nobody_implements_have_no_caller():
    bus = PluginBus([("a", Calls([], "a"))])
    assert bus.caller("on_train_batch_end") is None
    assert bus.caller("on_epoch_end") is not None
    assert bus.call("on_train_batch_end", trainer=None, batch=0, logs={}) == []


def test_profile_records_time_per_plugin_per_hook():
    bus = PluginBus([("a", Calls([], "a"))], profile=True)
    for epoch in range(3):
        bus.call("on_epoch_end", trainer=None, epoch=epoch, logs={})
    report = bus.profile_report()
    assert report["a"]["on_epoch_end"]["calls"] == 3
    assert report["a"]["on_epoch_end"]["seconds"] >= 0


def test_chain_feeds_each_implementation_the_previous_result():
    class Double:
        @hookimpl
        def transform_gradients(self, gradients):
            return [g * 2 for g in gradients]

    class AddOne:
        @hookimpl
        def transform_gradients(self, gradients, optimizer_name):
            return [g + 1 for g in gradients]

    class Passive:
        @hookimpl
        def transform_gradients(self, gradients):
            return None

    bus = PluginBus([("double", Double()), ("passive", Passive()), ("add", AddOne())])
    result = bus.chain("transform_gradients", "gradients", [1, 2], trainer=None, variables=[], optimizer_name="default")
    assert result == [3, 5]


def test_plugin_state_round_trip():
    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    a, b = Counter(), Counter()
    a.n = 7
    PluginBus([("counter", b)]).load_state_dict(PluginBus([("counter", a)]).state_dict())
    assert b.n == 7


def test_tracing_goes_to_logging(monkeypatch, caplog):
    monkeypatch.setenv("COREBUS_TRACE", "1")
    bus = PluginBus([("a", Calls([], "a"))])
    with caplog.at_level(logging.DEBUG, logger="corebus.trace"):
        bus.call("on_epoch_end", trainer=None, epoch=0, logs={})
    assert "on_epoch_end -> ['a']" in caplog.text


def test_lazy_logs_fetch_once_and_names_are_free():
    import numpy as np

    before = LazyLogs.fetches
    logs = LazyLogs(["loss", "accuracy"], np.array([0.5, 0.75], np.float32))
    assert list(logs) == ["loss", "accuracy"] and "loss" in logs and len(logs) == 2
    assert LazyLogs.fetches == before and not logs.fetched
    assert logs["loss"] == 0.5 and logs["accuracy"] == 0.75 and dict(logs) == {"loss": 0.5, "accuracy": 0.75}
    assert LazyLogs.fetches == before + 1
    with pytest.raises(KeyError):
        logs["nope"]


def test_a_derived_view_computes_from_both_calls_once_and_to_dict_matches_reads():
    import numpy as np

    from corebus.bus.logs import _Packed

    # running means after 64 rows (earlier call) and after 128 rows (this call)
    earlier = _Packed(np.array([0.5, 0.5], np.float32))
    now = _Packed(np.array([0.4, 0.75], np.float32))
    before = LazyLogs.fetches
    view = LazyLogs._of_call(("loss", "accuracy"), (0, 1), now, ((("accuracy", 1),), earlier, 64, 128))
    assert list(view) == ["loss", "accuracy"] and LazyLogs.fetches == before  # names cost nothing
    assert view["accuracy"] == 1.0  # (0.75 * 128 - 0.5 * 64) / 64: the call's own accuracy
    assert LazyLogs.fetches == before + 2  # this call's vector and the earlier one, once each
    assert view.to_dict() == {"loss": pytest.approx(0.4), "accuracy": 1.0} == {name: view[name] for name in view}
    assert LazyLogs.fetches == before + 2
    plain = LazyLogs._of_call(("accuracy",), (1,), earlier)
    assert plain.to_dict() == {"accuracy": 0.5} and LazyLogs.fetches == before + 2  # shares the fetch


def test_list_order_holds_in_every_tier():
    log = []

    class Last:
        def __init__(self, tag):
            self.tag = tag

        @hookimpl(trylast=True)
        def on_epoch_end(self):
            log.append(self.tag)

    bus = PluginBus([("x", Last("x")), ("y", Last("y")), ("plain", Calls(log, "plain")), ("z", Last("z"))])
    bus.call("on_epoch_end", trainer=None, epoch=0, logs={})
    assert log == ["plain", "x", "y", "z"]


def test_disable_policy_counts_failures_in_a_row_and_warns_once_per_streak(caplog):
    class Flaky:
        error_policy, max_failures = "disable", 3

        def __init__(self, fail_at):
            self.fail_at, self.calls = set(fail_at), 0

        @hookimpl
        def on_epoch_end(self, epoch):
            self.calls += 1
            if epoch in self.fail_at:
                raise ValueError(f"backend down at {epoch}")

    flaky = Flaky(fail_at={0, 1, 3, 4, 6, 7, 8, 9})
    bus = PluginBus([("logger", flaky)])
    with caplog.at_level(logging.WARNING, logger="corebus"):
        for epoch in range(10):
            bus.call("on_epoch_end", trainer=None, epoch=epoch, logs={})
    # two failures, a success, two failures, a success: never 3 in a row until epochs 6, 7, 8
    assert flaky.calls == 9 and "logger" in bus.disabled
    warnings = [r.getMessage() for r in caplog.records]
    assert [w.split(":")[0] for w in warnings] == ["plugin 'logger' failed in on_epoch_end"] * 3 + [
        "plugin 'logger' disabled after 3 failures in a row; the run goes on without it"
    ]


def test_direct_callers_give_pluggys_results_and_errors_and_wrappers_keep_pluggy():
    import pluggy

    class Answers:
        def __init__(self, value):
            self.value = value

        @hookimpl
        def on_log(self, kind, step):
            return None if self.value is None else (self.value, kind, step)

    bus = PluginBus([("first", Answers(1)), ("silent", Answers(None)), ("last", Answers(3))])
    direct = bus.caller("on_log")
    assert not isinstance(direct, pluggy.HookCaller)  # the engine's per-step path skips pluggy's
    kwargs = dict(trainer=None, kind="batch", step=7, logs={})
    assert direct(**kwargs) == bus.pm.hook.on_log(**kwargs) == [(1, "batch", 7), (3, "batch", 7)]
    with pytest.raises(pluggy.HookCallError, match="'step'"):
        direct(trainer=None, kind="batch", logs={})

    class Wrapping:
        @hookimpl(wrapper=True)
        def on_log(self):
            result = yield
            return result + ["wrapped"]

    wrapped = PluginBus([("first", Answers(1)), ("wrapper", Wrapping())])
    assert isinstance(wrapped.caller("on_log"), pluggy.HookCaller)
    assert wrapped.caller("on_log")(**kwargs) == [(1, "batch", 7), "wrapped"]


class MisspelledHook:
    @hookimpl
    def on_epoch_ends(self, epoch):  # the user meant on_epoch_end; pluggy alone would ignore it
        raise AssertionError("never called")


class OptionalExtraHook:
    @hookimpl(optionalhook=True)
    def on_something_newer(self, epoch):  # a hook of a later corebus: allowed, explicitly
        return None


def test_a_misspelled_hook_is_an_error_naming_the_method_and_the_closest_hook():
    with pytest.raises(ConfigError) as error:
        PluginBus([("typo", MisspelledHook())])
    message = str(error.value)
    assert "plugin 'typo'" in message and "on_epoch_ends" in message and "did you mean on_epoch_end?" in message
    PluginBus([("newer", OptionalExtraHook())])  # marked optional: no error


def test_a_misspelled_hook_fails_before_training_in_both_engines():
    import corebus
    from corebus.testing import tiny_data, tiny_model

    x, y = tiny_data(32)
    with pytest.raises(ConfigError, match="on_epoch_ends .*did you mean on_epoch_end"):
        corebus.Trainer(tiny_model(), "sgd", "sparse_categorical_crossentropy", plugins=[MisspelledHook()])
    model = tiny_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ConfigError, match="on_epoch_ends"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[corebus.KerasCallback([MisspelledHook()])])
    assert model.optimizer.iterations.numpy() == 0
