"""The Recorder under misuse, round three: each case refused with the library's exception, nothing lost or stuck."""

import json
import math
import shutil
import threading
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_equal_params, batches, make_model, mse, sgd_recorder, train_recorded

from autoclip import AutoClip, wrap
from dynamics import Recorder, RunError, load_run
from dynamics.errors import ArgumentTypeError, CallOrderError, DynamicsError
from dynamics.quantities import Quantity


class _Const(Quantity):
    """A quantity returning whatever it is given (for the column-typing cases)."""

    name = "const"

    def __init__(self, value, kind="float64", table="metrics"):
        super().__init__()
        self.value, self.columns, self.table = value, {"c": kind}, table

    def compute(self, ctx):
        return {"c": self.value(ctx) if callable(self.value) else self.value}


# -- data: nothing lost ----------------------------------------------------------------------------


def test_log_eval_with_another_set_of_keys_keeps_every_row(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=2)
    data = batches(4)
    train_recorded(rec, model, data[:2])
    rec.log_eval(accuracy=0.5)
    train_recorded(rec, model, data[2:])
    rec.log_eval(accuracy=0.75, f1=0.25)
    running = load_run(tmp_path / "run").eval  # read from the journal while running
    rec.close()
    for frame in (running, load_run(tmp_path / "run").eval):
        assert frame.step.tolist() == [2, 4]
        assert frame.accuracy.tolist() == [0.5, 0.75]
        assert math.isnan(frame.f1.iloc[0]) and frame.f1.iloc[1] == 0.25


def test_log_eval_refuses_an_empty_row_a_step_and_non_numbers(tmp_path):
    _, _, rec = sgd_recorder(tmp_path)
    with pytest.raises(DynamicsError, match="at least one metric"):
        rec.log_eval()
    with pytest.raises(DynamicsError, match="step is the Recorder's own"):
        rec.log_eval(step=3, accuracy=0.1)
    with pytest.raises(ArgumentTypeError, match="takes a number"):
        rec.log_eval(accuracy="high")
    rec.close()
    assert len(load_run(tmp_path / "run").eval) == 0


def test_a_deleted_journal_is_refused_at_close_instead_of_finishing_empty(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    rec.checkpoint()
    train_recorded(rec, model, batches(2, seed=5))
    shutil.rmtree(tmp_path / "run" / "journal")
    with pytest.raises(RunError, match="missing"):
        rec.close()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "running"  # not a finished run of 0 rows
    assert not (tmp_path / "run" / "metrics.parquet").exists()


def test_an_int64_column_keeps_two_to_the_53_plus_one(tmp_path):
    big = 2**53 + 1
    model, _, rec = sgd_recorder(tmp_path, every=2, quantities=[_Const(torch.tensor(big), "int64")])
    train_recorded(rec, model, batches(2))
    rec.close()
    assert load_run(tmp_path / "run").metrics.c.tolist() == [big]


@pytest.mark.parametrize(
    "value,kind,match",
    [(2.7, "int64", "whole numbers"), (0.3, "bool", "0/1"), (torch.tensor([2.0, 3.0]), "float64", "shape")],
)
def test_a_value_its_column_cannot_hold_is_refused_not_coerced(tmp_path, value, kind, match):
    model, _, rec = sgd_recorder(tmp_path, every=1, quantities=[_Const(value, kind)])
    x, y = batches(1)[0]
    with pytest.raises(DynamicsError, match=match):
        rec.step(lambda: mse(model, x, y))


def test_a_2x2_tensor_does_not_fill_a_4_row_layers_column(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))  # 4 parameter tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = _Const(torch.ones(2, 2), table="layers")
    rec = Recorder(model, opt, tmp_path / "run", every=1, quantities=[q])
    with pytest.raises(DynamicsError, match=r"shape \(2, 2\)"):
        rec.step(lambda: model(torch.ones(3, 2)).pow(2).mean())


class _Keys(Quantity):
    name = "keys"
    columns = {"a": "float64"}

    def __init__(self, result):
        super().__init__()
        self.result = result

    def compute(self, ctx):
        return self.result


@pytest.mark.parametrize("result", [{"b": 1.0}, {"a": 1.0, "extra": 2.0}, [1.0]])
def test_a_quantity_returning_wrong_or_extra_keys_is_named(tmp_path, result):
    model, _, rec = sgd_recorder(tmp_path, every=1, quantities=[_Keys(result)])
    x, y = batches(1)[0]
    with pytest.raises(DynamicsError, match="_Keys.compute returned"):
        rec.step(lambda: mse(model, x, y))


def test_empty_column_names_are_refused(tmp_path):
    q = _Const(1.0)
    q.columns = {"": "float64"}
    with pytest.raises(DynamicsError, match="non-empty strings"):
        sgd_recorder(tmp_path, quantities=[q])


class _Mover(Quantity):
    name = "mover"
    columns = {"m": "float64"}

    def compute(self, ctx):
        ctx.params[0].add_(1.0)
        return {"m": 0.0}


def test_a_quantity_that_moves_the_live_parameters_is_refused_and_they_are_restored(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=1, quantities=[_Mover()])
    x, y = batches(1)[0]
    reference = make_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    opt.zero_grad()
    mse(reference, x, y).backward()
    opt.step()
    with pytest.raises(DynamicsError, match="changed the live parameters"):
        rec.step(lambda: mse(model, x, y))
    assert_equal_params(list(model.parameters()), list(reference.parameters()))


class _Broken(Quantity):
    name = "broken"
    columns = {"b": "float64"}

    def compute(self, ctx):
        raise RuntimeError("double backward is not supported")


def test_a_failing_quantity_fails_the_step_by_name_and_leaves_the_run_resumable(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2, quantities=[*Recorder.default_quantities(), _Broken(every=4)])
    data = batches(4)
    train_recorded(rec, model, data[:2])
    rec.checkpoint()
    with pytest.raises(DynamicsError, match="quantity 'broken' failed at step 4"):
        train_recorded(rec, model, data[2:])
    rec.release()
    resumed = Recorder(model, opt, tmp_path / "run", every=2, resume=True)
    assert resumed.t == 2
    resumed.close()


# -- wrong: counted twice, schedules mixed ------------------------------------------------------------


def test_the_same_autoclip_in_wrap_and_in_the_recorder_is_refused(tmp_path):
    model = make_model()
    clipper = AutoClip(model.parameters(), p=10)
    wrapped = wrap(torch.optim.SGD(model.parameters(), lr=0.1), clipper)
    with pytest.raises(DynamicsError, match="count twice"):
        Recorder(model, wrapped, tmp_path / "run", clipper=clipper)


def test_resuming_with_another_every_is_refused(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    state = rec.release()
    with pytest.raises(RunError, match="every=2"):
        Recorder(model, opt, tmp_path / "run", every=3, resume=state)
    with pytest.raises(RunError, match="every=2"):
        Recorder(model, opt, tmp_path / "run", every=3, resume=True)
    Recorder(model, opt, tmp_path / "run", every=2, resume=state).close()  # not stuck: the right every resumes


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s.pop("journal"), "lacks"),
        (lambda s: s.update(version=99), "newer"),
        (lambda s: s.update(t=-1), ">= 0"),
    ],
)
def test_resume_states_with_missing_keys_or_from_the_future_are_refused(tmp_path, change, match):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(2))
    state = rec.release()
    change(state)
    with pytest.raises(DynamicsError, match=match):
        Recorder(model, opt, tmp_path / "run", every=2, resume=state)


def test_garbage_quantity_state_is_refused_by_name(tmp_path):
    from dynamics.quantities import DistanceFromInit

    model, opt, rec = sgd_recorder(tmp_path, every=2, quantities=[DistanceFromInit()])
    train_recorded(rec, model, batches(2))
    state = rec.release()
    state["quantities"]["distance_from_init"] = {"initial": "garbage"}
    with pytest.raises(DynamicsError, match="distance_from_init"):
        Recorder(model, opt, tmp_path / "run", every=2, resume=state, quantities=[DistanceFromInit()])


# -- wrong types and calls ----------------------------------------------------------------------------


def test_wrong_types_get_the_librarys_exception_naming_the_fix(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ArgumentTypeError, match="torch.nn.Module"):
        Recorder("model", opt, tmp_path / "a")
    with pytest.raises(ArgumentTypeError, match="Clipper such as AutoClip"):
        Recorder(model, opt, tmp_path / "b", clipper="autoclip")
    with pytest.raises(ArgumentTypeError, match="positive integer"):
        Recorder(model, opt, tmp_path / "c", every=2.5)
    with pytest.raises(ArgumentTypeError, match="callable"):
        Recorder(model, opt, tmp_path / "d", loggers=["tensorboard"])
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_a_closure_returning_a_float_and_a_vector_loss_are_refused(tmp_path):
    model, _, rec = sgd_recorder(tmp_path)
    with pytest.raises(ArgumentTypeError, match="return the loss as a tensor"):
        rec.step(lambda: 0.5)
    assert not rec.in_step  # the broken step is forgotten, the Recorder goes on
    x, y = batches(1)[0]
    rec.begin()
    loss = (model(x) - y).pow(2)
    loss.mean().backward()
    rec.after_backward()
    with pytest.raises(ArgumentTypeError, match="reduce it"):
        rec.end(loss)


def test_negative_or_fractional_epochs_are_refused(tmp_path):
    _, _, rec = sgd_recorder(tmp_path)
    with pytest.raises(DynamicsError):
        rec.begin(epoch=-1)
    with pytest.raises(DynamicsError):
        rec.begin(epoch=1.5)


def test_two_threads_stepping_one_recorder_are_refused(tmp_path):
    model, _, rec = sgd_recorder(tmp_path)
    rec.begin()
    errors = []

    def other():
        try:
            rec.after_backward()
        except CallOrderError as e:
            errors.append(e)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "two threads" in str(errors[0])


def test_an_optimizer_of_some_parameters_warns_and_a_clipper_of_another_model_is_refused(tmp_path):
    model = make_model()
    first = list(model.parameters())[:2]
    with pytest.warns(UserWarning, match="holds 2 of the model's 6"):
        Recorder(model, torch.optim.SGD(first, lr=0.1), tmp_path / "a").close()
    other = make_model(seed=3)
    with pytest.raises(DynamicsError, match="not the model's"):
        Recorder(
            model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "b", clipper=AutoClip(other.parameters())
        )


# -- stuck: a dead run can be replaced, a live one never ---------------------------------------------


def test_overwrite_replaces_a_dead_run_and_refuses_a_live_one(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    with pytest.raises(RunError, match="being recorded by another process"):
        Recorder(model, opt, tmp_path / "run", overwrite=True)
    with pytest.raises(RunError, match="already holds a run"):
        Recorder(model, opt, tmp_path / "run")
    rec.run.release()  # the recording process died: the OS dropped its lock
    fresh = Recorder(model, opt, tmp_path / "run", every=2, overwrite=True)
    train_recorded(fresh, model, batches(2))
    fresh.close()
    run = load_run(tmp_path / "run")
    assert run.steps.step.tolist() == [1, 2] and run.config["run_id"] == fresh.config["run_id"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep")
    model = make_model()
    with pytest.raises(RunError, match="not an empty directory"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep"


# -- what the Recorder now adds ------------------------------------------------------------------------


def test_loggers_get_each_metrics_row_without_nan_and_training_is_unchanged(tmp_path):
    logged = []
    model, _, rec = sgd_recorder(tmp_path, every=3, probes=0, loggers=[lambda m, s: logged.append((s, m))])
    data = batches(9)
    train_recorded(rec, model, data)
    rec.close()
    metrics = load_run(tmp_path / "run").metrics
    assert [s for s, _ in logged] == metrics.step.tolist() == [3, 6, 9]
    for (_, values), (_, row) in zip(logged, metrics.iterrows()):
        assert "dyn/smoothness" not in values  # NaN (probes=0) is left out
        for column in ("loss", "grad_norm", "step_size", "clip_rate", "lr"):
            assert values[f"dyn/{column}"] == pytest.approx(row[column], rel=1e-12)
    reference = make_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for x, y in data:
        opt.zero_grad()
        mse(reference, x, y).backward()
        opt.step()
    assert_equal_params(list(model.parameters()), list(reference.parameters()))


def test_a_logger_that_raises_is_warned_about_once_and_dropped(tmp_path):
    calls = []

    def broken(metrics, step):
        calls.append(step)
        raise ConnectionError("server gone")

    model, _, rec = sgd_recorder(tmp_path, every=2, loggers=[broken])
    with pytest.warns(UserWarning, match="server gone") as caught:
        train_recorded(rec, model, batches(6))
    rec.close()
    assert calls == [2] and len([w for w in caught if "server gone" in str(w.message)]) == 1
    assert len(load_run(tmp_path / "run").metrics) == 3


def test_clip_rate_is_the_fraction_of_clipped_steps_since_the_previous_record(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder(model, opt, tmp_path / "run", every=5, clipper=AutoClip(model.parameters(), p=30))
    train_recorded(rec, model, batches(20))
    rec.checkpoint()  # a checkpoint between record steps must not reset the count
    train_recorded(rec, model, batches(3, seed=4))
    rec.close()
    run = load_run(tmp_path / "run")
    clipped = run.steps.set_index("step").clipped
    for step, rate in zip(run.metrics.step, run.metrics.clip_rate):
        assert rate == pytest.approx(clipped.loc[step - 4 : step].mean(), abs=1e-12)
    assert 0 < run.metrics.clip_rate.max() and run.metrics.clip_rate.min() < 1


def test_clip_rate_survives_a_resume_between_record_steps(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    clipper = AutoClip(model.parameters(), p=30)
    rec = Recorder(model, opt, tmp_path / "b", every=4, clipper=clipper)
    train_recorded(rec, model, batches(6))
    state = rec.release()
    rec = Recorder(model, opt, tmp_path / "b", every=4, clipper=clipper, resume=state)
    train_recorded(rec, model, batches(2, seed=9))
    rec.close()
    run = load_run(tmp_path / "b")
    clipped = run.steps.set_index("step").clipped
    assert run.metrics.clip_rate.iloc[-1] == pytest.approx(clipped.loc[5:8].mean())


def test_every_parquet_file_carries_the_config_with_its_run_id(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    rec.log_eval(accuracy=1.0)
    rec.close()
    for table in ("metrics", "steps", "layers", "eval"):
        meta = pq.read_schema(tmp_path / "run" / f"{table}.parquet").metadata
        config = json.loads(meta[b"dyn.config"])
        assert config["run_id"] == rec.config["run_id"] and config["status"] == "finished"


class _MicroSum(Quantity):
    name = "micro"
    uses_micro_batches = True
    columns = {"micro_batches": "int64", "last_equals_step": "bool"}

    def compute(self, ctx):
        snaps = ctx.micro_grads or []
        same = all(torch.equal(a, b) for a, b in zip(snaps[-1], ctx.grads)) if snaps else False
        return {"micro_batches": torch.tensor(len(snaps)), "last_equals_step": torch.tensor(same)}


def test_micro_batch_snapshots_the_accumulated_gradients_on_record_steps_only(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2, quantities=[_MicroSum()])
    data = batches(12)
    for t in range(4):
        rec.begin()
        opt.zero_grad()
        for x, y in data[3 * t : 3 * t + 3]:
            (mse(model, x, y) / 3).backward()
            rec.micro_batch()
        assert len(rec._state.micro_grads) == (3 if rec.recording else 0)
        rec.after_backward()
        opt.step()
        rec.end(None)
    rec.close()
    metrics = load_run(tmp_path / "run").metrics
    assert metrics.micro_batches.tolist() == [3, 3] and metrics.last_equals_step.tolist() == [True, True]


def test_recording_says_which_steps_record(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=3)
    seen = []
    for x, y in batches(6):
        rec.begin()
        seen.append(rec.recording)
        opt.zero_grad()
        mse(model, x, y).backward()
        rec.after_backward()
        opt.step()
        rec.end(None)
        assert not rec.recording
    rec.close()
    assert seen == [False, False, True, False, False, True]


def test_no_warning_for_a_plain_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _, rec = sgd_recorder(tmp_path, every=2)
        train_recorded(rec, model, batches(2))
        rec.close()


def test_an_on_device_autoclip_records_the_same_tables_as_the_host_path(tmp_path):
    from helpers import tables_without_time

    for on_device in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        clipper = AutoClip(model.parameters(), p=30, on_device=on_device)
        rec = Recorder(model, opt, tmp_path / str(on_device), every=5, clipper=clipper)
        train_recorded(rec, model, batches(12))
        rec.checkpoint()  # steps rows between record steps go through a transfer of their own
        train_recorded(rec, model, batches(8, seed=3))
        rec.close()
    host, device = tables_without_time(tmp_path / "False"), tables_without_time(tmp_path / "True")
    for table in host:
        assert host[table].equals(device[table]), table
    assert 0 < host["metrics"].clip_rate.max()


def test_an_on_device_autoclip_makes_no_host_read_between_record_steps(tmp_path, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    clipper = AutoClip(model.parameters(), p=30, on_device=True, nonfinite="zero")
    rec = Recorder(model, opt, tmp_path / "run", every=5, clipper=clipper)
    data = batches(5)
    train_recorded(rec, model, data[:1])  # warm up outside the count
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    train_recorded(rec, model, data[1:4])  # steps 2-4: none records
    between = list(reads)
    train_recorded(rec, model, data[4:])  # step 5 records
    monkeypatch.undo()
    rec.close()
    assert between == [] and reads == ["tolist"]  # the one transfer of the record step
