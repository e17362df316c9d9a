"""Regressions a hostile sweep of misuse cases found: each case refused cleanly, nothing lost, nothing stuck.

Every test names what it guards. The sweep covered the Recorder and its phase calls, states and
checkpoints, quantity values on their way to a column, save_run/load_run, the loggers, autoclip,
and the readers of damaged run directories.
"""

import json
import math
import os
import shutil
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import batches, make_model, mse, sgd_recorder, train_recorded

from autoclip import AutoClip, wrap
from dynamics import Recorder, RunError, load_run, save_run
from dynamics.errors import ArgumentTypeError, CallOrderError, DynamicsError
from dynamics.quantities import DistanceFromInit, Quantity, StepSize, UpdateCosine


def _rows(path):
    run = load_run(path)
    return {name: len(getattr(run, name)) for name in ("metrics", "steps", "eval")}


class _Const(Quantity):
    name = "const"

    def __init__(self, value, kind="float64", table="metrics"):
        super().__init__()
        self.value, self.columns, self.table = value, {"c": kind}, table

    def compute(self, ctx):
        return {"c": self.value}


# -- nothing stuck: a refused start holds no lock; a dead run without its config is replaced ------------------


def test_a_refused_resume_leaves_the_run_unlocked_for_the_next_try_in_the_same_process(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    rec.checkpoint()
    state = rec.release()
    with pytest.raises(DynamicsError) as kept:  # kept alive, with the failed Recorder in its traceback
        Recorder(model, opt, tmp_path / "run", every=2, resume={**state, "t": -1})
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(RunError, match="damaged"):
        Recorder(model, opt, tmp_path / "run", every=2, resume=True)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(good)
    resumed = Recorder(model, opt, tmp_path / "run", every=2, resume=True)
    assert resumed.t == 4 and kept.value is not None
    resumed.close()


@pytest.mark.parametrize("leftover", ["lock only", "config.json a folder", "config.json deleted"])
def test_a_dead_run_without_a_readable_config_is_replaced_with_overwrite(tmp_path, leftover):
    run_dir = tmp_path / "run"
    if leftover == "lock only":  # killed between taking the lock and writing config.json
        run_dir.mkdir()
        (run_dir / ".lock").write_text("")
        (run_dir / "config.json.tmp").write_text("{")
        model, _, rec = sgd_recorder(tmp_path, every=2)  # a new run may go there, overwrite or not
    else:
        model, opt, dead = sgd_recorder(tmp_path, every=2)
        train_recorded(dead, model, batches(2))
        dead.checkpoint()
        dead.run.release()  # the process died
        (run_dir / "config.json").unlink()
        if leftover == "config.json a folder":
            (run_dir / "config.json").mkdir()
        with pytest.raises(RunError, match="overwrite=True"):
            Recorder(model, opt, run_dir, every=2)
        rec = Recorder(model, opt, run_dir, every=2, overwrite=True)
    train_recorded(rec, model, batches(2))
    rec.close()
    assert load_run(run_dir).steps.step.tolist() == [1, 2]


def test_overwrite_still_never_replaces_a_folder_with_files_dyn_did_not_write(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("")
    (run_dir / "notes.txt").write_text("keep")
    model = make_model()
    with pytest.raises(RunError, match="not an empty directory"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir, overwrite=True)
    assert (run_dir / "notes.txt").read_text() == "keep"


# -- nothing lost: a refused state cuts no row; a journal cut under its writer is not finished --------------


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: {**s, "clipper": {"x": 1}}, "clipper state does not fit"),
        (lambda s: {**s, "quantities": {"distance_from_init": {"initial": [torch.ones(2)]}}}, "distance_from_init"),
        (lambda s: {**s, "time_s": "soon"}, "time_s"),
        (lambda s: {**s, "clip_count": "x"}, "clip_count"),
    ],
)
def test_a_refused_state_cuts_no_journal_row_and_changes_no_clipper(tmp_path, change, match):
    model = make_model()
    clipper = AutoClip(model.parameters(), p=30)
    _, _, rec = sgd_recorder(tmp_path, model=model, every=2, clipper=clipper, quantities=[DistanceFromInit()])
    train_recorded(rec, model, batches(4))
    state = rec.state_dict()
    train_recorded(rec, model, batches(2, seed=3))
    history = clipper.state_dict()["histories"][0].sort().values
    with pytest.raises(DynamicsError, match=match):
        rec.load_state_dict(change(state))
    assert torch.equal(clipper.state_dict()["histories"][0].sort().values, history) and rec.t == 6
    rec.close()
    assert _rows(tmp_path / "run") == {"metrics": 3, "steps": 6, "eval": 0}


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: {**s, "journal": {k: "x" for k in s["journal"]}}, "segment names to byte counts"),
        (lambda s: {**s, "journal": {k: -5 for k in s["journal"]}}, "segment names to byte counts"),
        (lambda s: {**s, "journal": {"../../elsewhere.arrows": 0}}, "segment names to byte counts"),
        (lambda s: {**s, "time_s": math.nan}, "time_s"),
        (lambda s: {**s, "quantities": [1]}, "quantities must map"),
        (lambda s: {**s, "quantities": {"step_size": "garbage"}}, "quantities must map"),
        (lambda s: {**s, "clip_count": [-1, -2]}, "clip_count"),
        (lambda s: {**s, "last_eval_step": "x"}, "last_eval_step"),
        (lambda s: {**s, "every": "2"}, "every must be a positive integer"),
        (lambda s: {**s, "version": "2"}, "version must be an integer"),
    ],
)
def test_malformed_state_fields_are_refused_by_name(tmp_path, change, match):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(2))
    state = rec.release()
    with pytest.raises(DynamicsError, match=match):
        Recorder(model, opt, tmp_path / "run", every=2, resume=change(state))


def _edit_checkpoint(path, change):
    state = torch.load(path, weights_only=False)
    torch.save(change(state), path)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: [1, 2], "holds a list"),
        (lambda s: {k: v for k, v in s.items() if k != "model"}, "its model is missing"),
        (lambda s: {k: v for k, v in s.items() if k != "rng"}, "its rng is missing"),
        (lambda s: {**s, "extra": "x"}, "its extra is missing or not a dict"),
        (lambda s: {**s, "model": torch.nn.Linear(3, 3).state_dict()}, "does not fit this model"),
        (lambda s: {**s, "optimizer": {"x": 1}}, "does not fit this model and optimizer"),
        (lambda s: {**s, "version": 99}, "newer than this dyn reads"),
    ],
)
def test_damaged_or_foreign_checkpoints_are_refused_as_run_errors(tmp_path, change, match):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(2))
    rec.checkpoint()
    rec.release()
    _edit_checkpoint(tmp_path / "run" / "checkpoint.pt", change)
    with pytest.raises(RunError, match=match):  # a RunError: `dyn record --resume` answers it in one line
        Recorder(model, opt, tmp_path / "run", every=2, resume=True)


def test_a_journal_cut_under_its_writer_is_refused_at_close_and_left_unlocked(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    rec.checkpoint()
    for segment in (tmp_path / "run" / "journal").glob("steps.*.arrows"):
        os.truncate(segment, 50)  # the writer goes on at its offset: zeros where rows were
    train_recorded(rec, model, batches(2, seed=3))
    with pytest.raises(RunError, match="damaged"):
        rec.close()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == "running"
    Recorder(model, opt, tmp_path / "run", every=2, overwrite=True).close()  # not stuck: nobody holds it


# -- values on their way to a column keep their type and their bits ------------------------------------------


def test_python_floats_keep_their_float64_bits_in_quantity_columns(tmp_path):
    two = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))  # 4 parameter tensors
    opt = torch.optim.SGD(two.parameters(), lr=0.1)
    metrics, layers = _Const(0.1), _Const([0.1, 0.2, 0.3, 0.4], table="layers")
    layers.name = "per_layer"
    rec = Recorder(two, opt, tmp_path / "run", every=1, quantities=[metrics, layers])
    rec.step(lambda: two(torch.ones(3, 2)).pow(2).mean())
    rec.close()
    run = load_run(tmp_path / "run")
    assert run.metrics.c.tolist() == [0.1] and run.layers.c.tolist() == [0.1, 0.2, 0.3, 0.4]


def test_a_value_beyond_float32_is_refused_for_a_float32_column(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=1, quantities=[_Const(1e300, "float32")])
    x, y = batches(1)[0]
    with pytest.raises(DynamicsError, match="beyond float32's range"):
        rec.step(lambda: mse(model, x, y))


def test_a_loss_that_is_not_one_real_number_is_refused_and_a_numpy_scalar_is_a_number(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=1)
    x, y = batches(1)[0]

    def through_backward():
        rec.begin()
        opt.zero_grad()
        mse(model, x, y).backward()
        rec.after_backward()
        opt.step()

    through_backward()
    for loss, match in [(torch.tensor(1 + 1j), "real number"), (torch.tensor(1.0, device="meta"), "meta tensor")]:
        with pytest.raises(ArgumentTypeError, match=match):
            rec.end(loss)
    rec.end(np.float32(0.5))
    with pytest.raises(ArgumentTypeError, match="reduce it"):
        rec.step(lambda: (model(x) - y).pow(2))
    with pytest.raises(ArgumentTypeError, match="does not require grad"):
        rec.step(lambda: mse(model, x, y).detach())
    assert not rec.in_step  # the refused steps are forgotten
    rec.close()
    assert load_run(tmp_path / "run").steps.loss.tolist() == [0.5]


@pytest.mark.parametrize(
    "closure", [lambda: 0.5, lambda: torch.ones(3, requires_grad=True) * 2, lambda: torch.ones(())]
)
def test_a_closure_that_returns_no_loss_is_named_as_the_closures_fault(tmp_path, closure):
    model, opt, rec = sgd_recorder(tmp_path, every=1)
    x, y = batches(1)[0]
    rec.begin()
    opt.zero_grad()
    mse(model, x, y).backward()
    rec.after_backward()
    opt.step()
    with pytest.raises(DynamicsError, match="the step's closure"):
        rec.end(None, closure=closure)


# -- calls out of order, wrong types ------------------------------------------------------------------------


def test_state_calls_after_close_or_inside_a_step_and_a_non_dict_extra_are_refused(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=2)
    rec.begin()
    with pytest.raises(CallOrderError, match="middle of a step"):
        rec.state_dict()
    rec.abort_step()
    for extra in ("x", [1]):
        with pytest.raises(ArgumentTypeError, match="extra must be a dict"):
            rec.checkpoint(extra=extra)
    with pytest.raises(ArgumentTypeError, match="extra must be a dict"):
        rec.close(extra=5)
    train_recorded(rec, model, batches(2))
    state = rec.state_dict()
    rec.close()
    with pytest.raises(CallOrderError, match="closed"):
        rec.state_dict()
    with pytest.raises(CallOrderError, match="closed"):
        rec.load_state_dict(state)


def test_a_second_thread_is_named_whatever_phase_the_step_is_in(tmp_path):
    _, _, rec = sgd_recorder(tmp_path)
    rec.begin()
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(CallOrderError, rec.end, None)))
    thread.start()
    thread.join()
    assert "two threads" in str(errors[0].value)


def test_quantities_must_be_a_list_and_a_wrapped_optimizer_is_refused_with_the_fix(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ArgumentTypeError, match="list of Quantity objects"):
        Recorder(model, opt, tmp_path / "a", quantities=StepSize())
    wrapped = wrap(opt, AutoClip(model.parameters()))
    for clipper in (None, AutoClip(model.parameters(), p=50)):  # clipping unseen, or clipped twice
        with pytest.raises(DynamicsError, match="clipper=wrapped.clipper"):
            Recorder(model, wrapped, tmp_path / "b", clipper=clipper)
    with pytest.raises(ValueError, match="wrapped with this clipper already"):
        wrap(wrapped, wrapped.clipper)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_log_eval_at_one_step_merges_into_one_row_keeping_every_metric(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=1)
    train_recorded(rec, model, batches(2))
    rec.log_eval(a=1, b=3)
    rec.log_eval(a=0.5)  # the same step: the latest a, the b already logged
    state = rec.release()
    rec = Recorder(model, opt, tmp_path / "run", every=1, resume=state)
    rec.log_eval(c=2.0)  # still step 2, after a resume
    train_recorded(rec, model, batches(1))
    rec.log_eval(a=4.0)
    rec.close()
    frame = load_run(tmp_path / "run").eval
    assert frame.step.tolist() == [2, 3] and frame.a.tolist() == [0.5, 4.0]
    assert frame.b.tolist()[0] == 3.0 and frame.c.tolist()[0] == 2.0 and math.isnan(frame.c.tolist()[1])


def test_log_eval_refuses_a_nameless_metric_and_an_integer_float64_cannot_hold(tmp_path):
    _, _, rec = sgd_recorder(tmp_path)
    with pytest.raises(DynamicsError, match="needs a name"):
        rec.log_eval(**{"": 1.0})
    with pytest.raises(DynamicsError, match="2\\*\\*53"):
        rec.log_eval(tokens=2**53 + 1)
    rec.log_eval(tokens=2**53)
    rec.close()
    assert load_run(tmp_path / "run").eval.tokens.tolist() == [2**53]


def test_quantity_states_of_other_shapes_are_refused_when_loaded(tmp_path):
    model, opt, rec = sgd_recorder(tmp_path, every=2, quantities=[UpdateCosine(), DistanceFromInit()])
    train_recorded(rec, model, batches(2))
    state = rec.release()
    wrong = {"update_cosine": {"previous": [torch.ones(3)]}, "distance_from_init": {"initial": [torch.ones(2)] * 6}}
    for name, value in wrong.items():
        bad = {**state, "quantities": {**state["quantities"], name: value}}
        with pytest.raises(DynamicsError, match=name):
            Recorder(model, opt, tmp_path / "run", every=2, resume=bad, quantities=[UpdateCosine(), DistanceFromInit()])


def test_autoclip_refuses_a_history_that_is_not_numbers():
    clip = AutoClip(make_model().parameters())
    with pytest.raises(ValueError, match="history 0 must be a 1-D list"):
        clip.load_state_dict({**clip.state_dict(), "histories": [["a", "b"]]})


def test_the_tensorboard_logger_refuses_an_empty_path_and_a_file(tmp_path):
    from dynamics import loggers

    (tmp_path / "f").write_text("x")
    for path in ("", tmp_path / "f", tmp_path / "f" / "tb"):
        with pytest.raises(DynamicsError):
            loggers.tensorboard(path)


# -- save_run and load_run: what a reader would refuse is refused when written ---------------------------------

GOOD = pd.DataFrame({"step": [10, 20], "loss": [0.5, 0.4], "grad_norm": [1.0, 0.9], "smoothness": [2.0, 1.5]})


@pytest.mark.parametrize(
    "args,error,match",
    [
        (("R", "x"), ArgumentTypeError, "config must be a dict"),
        ((5, {}), ArgumentTypeError, "must be a path"),
        (("R", {"x": math.nan}), DynamicsError, "without NaN"),
        (("R", {"every": "x"}), RunError, "every should be int"),
    ],
)
def test_save_run_refuses_bad_arguments(tmp_path, args, error, match):
    run_dir, config = args
    with pytest.raises(error, match=match):
        save_run(tmp_path / "r" if run_dir == "R" else run_dir, config, metrics=GOOD)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "tables,match",
    [
        ({"metrics": "x"}, "takes a pandas DataFrame"),
        ({"metrics": GOOD.drop(columns=["step"])}, "needs a 'step' column"),
        ({"metrics": GOOD.assign(loss=["a", "b"])}, "column loss holds"),
        ({"metrics": GOOD.assign(loss=[1.0, "b"])}, "cannot be stored"),
        ({"layers": GOOD[["step"]].assign(grad_norm=1.0)}, "needs a 'name' column"),
        ({"bogus": GOOD}, "unknown tables"),
    ],
)
def test_save_run_refuses_tables_load_run_would_refuse(tmp_path, tables, match):
    with pytest.raises(ValueError, match=match):  # DynamicsError and RunError are ValueErrors
        save_run(tmp_path / "r", {}, **tables)
    assert not (tmp_path / "r").exists()


def test_save_run_never_writes_into_a_folder_that_holds_other_files(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.parquet").write_text("my own data")
    with pytest.raises(RunError, match="not an empty directory"):
        save_run(tmp_path / "r", {}, metrics=GOOD)
    assert (tmp_path / "r" / "metrics.parquet").read_text() == "my own data"


@pytest.mark.parametrize("path", [5, None, "", ["a"]])
def test_load_run_refuses_what_is_no_path(path):
    with pytest.raises(ArgumentTypeError, match="must be a path"):
        load_run(path)


# -- readers: a value a column cannot hold, a journal in pieces ------------------------------------------------


def _finished(path):
    save_run(path, {"clipper": {"kind": "AutoClip", "p": 10.0}}, metrics=GOOD.assign(epoch=0, clipped=False))
    return path


def _rewrite(path, change):
    frame = pd.read_parquet(path / "metrics.parquet")
    change(frame).to_parquet(path / "metrics.parquet")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda f: f.assign(step=f.step + 0.5), "column step"),
        (lambda f: f.assign(step=[10.0, math.nan]), "column step"),
        (lambda f: f.assign(step=pd.array([10, None], dtype="Int64")), "empty cells"),
        (lambda f: f.assign(epoch=0.5), "column epoch"),
        (lambda f: f.assign(clipped=0.3), "column clipped"),
    ],
)
def test_readers_refuse_a_value_its_column_cannot_hold_instead_of_truncating_it(tmp_path, change, match):
    run = _finished(tmp_path / "run")
    _rewrite(run, change)
    with pytest.raises(RunError, match=match):
        load_run(run)


def test_whole_numbers_in_a_float_column_still_read_as_integers(tmp_path):
    run = _finished(tmp_path / "run")
    _rewrite(run, lambda f: f.assign(step=f.step.astype(float), clipped=[1.0, 0.0]))
    frame = load_run(run).metrics
    assert frame.step.tolist() == [10, 20] and frame.clipped.tolist() == [True, False]


def _running(tmp_path):
    model, _, rec = sgd_recorder(tmp_path, every=2)
    train_recorded(rec, model, batches(4))
    rec.checkpoint()
    rec.release()
    return tmp_path / "run"


def _replace_by_folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda j: (shutil.rmtree(j), j.write_text("x")), "not a folder"),
        (lambda j: [_replace_by_folder(p) for p in j.glob("metrics.*.arrows")], "damaged journal"),
    ],
)
def test_a_journal_in_pieces_is_a_run_error_not_an_empty_run(tmp_path, damage, match):
    run = _running(tmp_path)
    damage(run / "journal")
    with pytest.raises(RunError, match=match):
        load_run(run)


# -- figures and the CLI I/O around them ------------------------------------------------------------------------


def test_figure_labels_tolerate_foreign_clipper_settings(tmp_path):
    import dataclasses

    from figures import style

    run = load_run(save_run(tmp_path / "r", {}, metrics=GOOD))
    for clipper in ({"kind": "AutoClip", "p": "ten"}, {"kind": "AutoClip", "p": math.nan}, {"kind": "AutoClip"},
                    {"kind": "ClipNorm"}, {"kind": 5}, "autoclip"):  # fmt: skip
        foreign = dataclasses.replace(run, config={"clipper": clipper})
        assert style.label(foreign) and style.threshold_label(foreign) and not style.draws_threshold(foreign)


def test_save_figure_and_the_animation_refuse_what_they_cannot_write(tmp_path):
    from figures import style
    from figures.animation import threshold_animation
    from figures.files import FigurePathError, save_figure

    plt = style.pyplot()
    fig = plt.figure()
    for path, match in [(tmp_path / "f.xyz", "cannot write .xyz"), (tmp_path / "no" / "f.png", "does not exist")]:
        with pytest.raises(FigurePathError, match=match):
            save_figure(fig, path)
    plt.close(fig)
    run = load_run(save_run(tmp_path / "r", {}, metrics=GOOD[["step", "loss"]]))
    with pytest.raises(ValueError, match="has no grad_norm"):
        threshold_animation(run, tmp_path / "a.gif", frames=2)
    with pytest.raises(ValueError, match="dpi must be a positive integer"):
        threshold_animation(run, tmp_path / "a.gif", frames=2, dpi=0)
    with pytest.raises(TypeError, match="takes a Run"):
        threshold_animation("runs/x", tmp_path / "a.gif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_plot_refuses_a_run_without_fig1_columns_and_export_an_empty_folder_name(tmp_path):
    from cli.main import dyn

    run = save_run(tmp_path / "r", {}, metrics=pd.DataFrame({"step": [1, 2], "foo": [1.0, 2.0]}))
    runner = CliRunner()
    plotted = runner.invoke(dyn, ["plot", str(run), "--out", str(tmp_path / "f.png")])
    assert plotted.exit_code == 2 and "none of the columns Fig. 1 draws" in plotted.output
    exported = runner.invoke(dyn, ["export", str(run), "--tensorboard", ""])
    assert exported.exit_code == 2 and "name a folder" in exported.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_load_runs_refuses_what_is_no_path():
    import dynamics
    from dynamics.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="root must be a path"):
        dynamics.load_runs(5)


def test_a_text_column_in_the_eval_table_is_left_out_of_the_summary(tmp_path):
    import pandas as pd

    from dynamics import load_run, save_run
    from dynamics.summary import summarize

    metrics = pd.DataFrame({"step": [1, 2], "loss": [1.0, 0.5], "grad_norm": [1.0, 2.0], "smoothness": [1.0, 3.0]})
    save_run(tmp_path / "run", {}, metrics=metrics, eval=pd.DataFrame({"step": [2], "note": ["good"], "acc": [0.5]}))
    row = summarize(load_run(tmp_path / "run"))
    assert row["final_acc"] == 0.5 and "final_note" not in row
