"""The Recorder under misuse and damage: nothing lost silently, nothing stuck."""

import shutil

import pytest
import torch

from autoclip import AutoClip
from dynamics import Recorder, RunError, load_run


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _train(rec, model, data):
    for x, y in data:
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))


def _checkpointed_run(tmp_path, steps=10, checkpoint_at=6):
    """A run killed (abandoned) after a checkpoint at ``checkpoint_at``: rows past it sit in the journal."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = Recorder(model, opt, tmp_path / "run", clipper=AutoClip(model.parameters(), p=50), every=2)
    data = _data(steps)
    _train(rec, model, data[:checkpoint_at])
    rec.checkpoint()
    _train(rec, model, data[checkpoint_at:])
    rec._flush_steps()
    rec.run.release()  # as if the process died: the OS drops the lock
    return tmp_path / "run"


def _resume(run_dir):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Recorder(model, opt, run_dir, clipper=AutoClip(model.parameters(), p=50), every=2, resume=True)


def _journal_bytes(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "journal").glob("*.arrows"))}


def test_close_twice_keeps_every_table(tmp_path):
    model = _model()
    with Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=2) as rec:
        _train(rec, model, _data(6))
        rec.close()
    run = load_run(tmp_path / "run")
    assert run.metrics.step.tolist() == [2, 4, 6] and len(run.steps) == 6 and len(run.layers) == 3 * 4


def test_step_after_close_raises_instead_of_starting_an_empty_run(tmp_path):
    model = _model()
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=2)
    _train(rec, model, _data(4))
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        _train(rec, model, _data(1))
    assert len(load_run(tmp_path / "run").steps) == 4


def test_phase_calls_out_of_order_say_which_call_is_missing(tmp_path):
    model = _model()
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=2)
    with pytest.raises(RuntimeError, match="call begin"):
        rec.after_backward()
    rec.begin()
    with pytest.raises(RuntimeError, match="call after_backward"):
        rec.end(0.0)
    with pytest.raises(RuntimeError, match="call end"):
        rec.close()  # a half-done step would checkpoint a model ahead of its step count
    rec.after_backward()
    rec.end(0.0)
    rec.close()
    assert load_run(tmp_path / "run").steps.step.tolist() == [1]


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "garbage", "deleted"])
def test_resume_refuses_a_journal_shorter_than_the_checkpoint(tmp_path, damage):
    run_dir = _checkpointed_run(tmp_path)
    segment = sorted((run_dir / "journal").glob("metrics.*.arrows"))[0]
    size = segment.stat().st_size
    if damage == "truncated":
        segment.write_bytes(segment.read_bytes()[: size // 2])
    elif damage == "zero_bytes":
        segment.write_bytes(b"")
    elif damage == "garbage":
        segment.write_bytes(bytes(range(256)) * (size // 256 + 1))
    else:
        segment.unlink()
    before = _journal_bytes(run_dir)
    with pytest.raises(RunError, match="cannot be resumed without losing rows"):
        _resume(run_dir)
    assert _journal_bytes(run_dir) == before  # refused before anything was cut


def test_resume_refuses_the_checkpoint_of_another_run(tmp_path):
    run_dir = _checkpointed_run(tmp_path / "a")
    other = _checkpointed_run(tmp_path / "b")
    shutil.copy(other / "checkpoint.pt", run_dir / "checkpoint.pt")
    with pytest.raises(RunError, match="belongs to another run"):
        _resume(run_dir)


@pytest.mark.parametrize("damage", [b"", b"\x00" * 10, b"random bytes, not a checkpoint" * 40])
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    run_dir = _checkpointed_run(tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(damage)
    with pytest.raises(RunError, match="checkpoint.pt is damaged"):
        _resume(run_dir)


def test_resume_rows_equal_an_uninterrupted_run(tmp_path):
    run_dir = _checkpointed_run(tmp_path / "killed")
    rec = _resume(run_dir)
    model = rec.model
    assert rec.t == 6
    _train(rec, model, _data(10)[6:])
    rec.close()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    full = Recorder(model, opt, tmp_path / "full", clipper=AutoClip(model.parameters(), p=50), every=2)
    _train(full, model, _data(10))
    full.close()
    a, b = load_run(run_dir), load_run(tmp_path / "full")
    for table in ("metrics", "steps", "layers"):
        cols = [c for c in getattr(a, table).columns if c != "time_s"]
        assert getattr(a, table)[cols].equals(getattr(b, table)[cols])


def test_a_run_without_checkpoint_restarts_in_place(tmp_path):
    model = _model()
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=2)
    _train(rec, model, _data(3))  # rows journalled, never checkpointed
    rec._flush_steps()
    rec.run.release()  # as if the process died
    model = _model()
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=2, resume=True)
    assert rec.t == 0
    _train(rec, model, _data(4))
    rec.close()
    assert load_run(tmp_path / "run").steps.step.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("every", [2.5, 0, -1, True, "20"])
def test_every_must_be_a_positive_integer(tmp_path, every):
    model = _model()
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=every)
    assert not (tmp_path / "run").exists()


def test_an_optimizer_of_other_parameters_is_refused(tmp_path):
    model, other = _model(), _model(1)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        Recorder(model, torch.optim.SGD(other.parameters(), lr=0.1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_journal_segments_are_durable_before_a_checkpoint_counts_them(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    model = _model()
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", every=2)
    _train(rec, model, _data(4))
    rec.checkpoint()
    names = [os.path.basename(p) for p in synced]
    assert names.index("checkpoint.pt.tmp") > max(names.index(n) for n in names if n.endswith(".arrows"))
    assert {n.split(".")[0] for n in names if n.endswith(".arrows")} == {"metrics", "steps", "layers"}
    rec.close()
