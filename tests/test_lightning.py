"""The Lightning callbacks: recording leaves training unchanged, AutoClip thresholds, resume, accumulation."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from autoclip import AutoClip, wrap  # noqa: E402
from dynamics import load_run  # noqa: E402
from dynamics.errors import DynamicsError  # noqa: E402
from dynamics.integrations.lightning import AutoClipCallback, DynamicsCallback  # noqa: E402
from dynamics.run import RunError  # noqa: E402
from tests.helpers import assert_equal_params, tables_without_time  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _loader(batches: int = 6):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8 * batches, 5, generator=g)
    x[::7] *= 10  # a few large gradients, so AutoClip clips some steps and not others
    y = x.sum(1, keepdim=True).sin()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


class Oracle(pl.Callback):
    """What a plain run sees: each micro-batch's loss and each step's gradient norm (after unscaling)."""

    def __init__(self):
        self.losses, self.norms = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


def _fit(tmp_path, callbacks, max_steps=8, dropout=0.2, ckpt_path=None, batches=6, **trainer_kw):
    torch.manual_seed(0)
    module = Net(dropout)
    trainer_kw.setdefault("logger", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_kw,
    )
    trainer.fit(module, _loader(batches), ckpt_path=ckpt_path)
    return module, trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_recording_leaves_training_unchanged_and_writes_rows(tmp_path):
    oracle = Oracle()
    plain, _ = _fit(tmp_path, [oracle])
    recorded, _ = _fit(tmp_path, [DynamicsCallback(tmp_path / "run", every=2, probes=1)])
    assert_equal_params(_params(plain), _params(recorded))
    run = load_run(tmp_path / "run")
    assert run.config["status"] == "finished"
    assert list(run.steps.step) == list(range(1, 9))
    assert list(run.metrics.step) == [2, 4, 6, 8]
    np.testing.assert_array_equal(run.steps.loss, np.float32(oracle.losses).astype(np.float64))
    np.testing.assert_allclose(run.steps.grad_norm, oracle.norms, rtol=1e-6)
    assert np.isfinite(run.metrics.smoothness).all() and (run.metrics.smoothness > 0).all()
    assert (run.metrics.step_size > 0).all()
    assert np.isinf(run.steps.threshold).all() and not run.steps.clipped.any()
    assert set(run.layers.name) == {n for n, _ in recorded.named_parameters()}


def test_accumulated_gradients_record_one_row_per_optimizer_step(tmp_path):
    oracle = Oracle()
    plain, _ = _fit(tmp_path, [oracle], max_steps=4, accumulate_grad_batches=2)
    recorded, _ = _fit(
        tmp_path, [DynamicsCallback(tmp_path / "run", every=2, probes=1)], max_steps=4, accumulate_grad_batches=2
    )
    assert_equal_params(_params(plain), _params(recorded))
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == [1, 2, 3, 4]
    micro = np.float32(oracle.losses).astype(np.float64)  # Lightning's outputs are already divided by 2
    np.testing.assert_allclose(run.steps.loss, micro[0::2] + micro[1::2], rtol=1e-6)
    np.testing.assert_allclose(run.steps.grad_norm, oracle.norms, rtol=1e-6)
    assert np.isfinite(run.metrics.smoothness).all()


@pytest.mark.parametrize("dynamics_first", [True, False])
def test_autoclip_and_dynamics_in_either_order(tmp_path, dynamics_first):
    clip_only = AutoClipCallback(p=25)
    reference, _ = _fit(tmp_path, [clip_only])
    run_dir = tmp_path / f"run{dynamics_first}"
    callbacks = [DynamicsCallback(run_dir, every=2, probes=1), AutoClipCallback(p=25)]
    recorded, _ = _fit(tmp_path, callbacks if dynamics_first else callbacks[::-1])
    assert_equal_params(_params(reference), _params(recorded))  # clipped once per step, as AutoClip alone
    steps = load_run(run_dir).steps
    norms = steps.grad_norm.to_numpy()
    expected = [np.percentile(norms[: t + 1], 25) for t in range(len(norms))]
    np.testing.assert_array_equal(steps.threshold, expected)
    np.testing.assert_array_equal(steps.clipped, norms > np.asarray(expected))
    assert steps.clipped.any() and not steps.clipped.all()
    assert sorted(clip_only.clipper.histories[0].values()) == sorted(norms)


def test_resume_from_a_checkpoint_records_what_an_uninterrupted_run_records(tmp_path):
    # epochs of 3 batches: checkpoints at epoch ends, where a plain DataLoader resumes exactly; no dropout,
    # since Lightning checkpoints do not hold the RNG state
    fit = lambda callbacks, **kw: _fit(tmp_path, callbacks, dropout=0.0, batches=3, **kw)  # noqa: E731
    whole, _ = fit([DynamicsCallback(tmp_path / "whole", every=2), AutoClipCallback(p=25)], max_steps=12)
    ckpts = tmp_path / "ckpts"
    saver = pl.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=3, save_top_k=-1)
    fit([DynamicsCallback(tmp_path / "resumed", every=2, finish=False), AutoClipCallback(p=25), saver], max_steps=6)
    assert load_run(tmp_path / "resumed").config["status"] == "running"
    assert list(load_run(tmp_path / "resumed").steps.step) == [1, 2, 3, 4, 5, 6]
    (step3,) = ckpts.glob("*step=3.ckpt")
    with pytest.raises(RunError, match="every=2"):  # another schedule would mix two in one table
        fit([DynamicsCallback(tmp_path / "resumed", every=3), AutoClipCallback(p=25)], max_steps=12, ckpt_path=step3)
    # resume from step 3: the rows of steps 4-6 are dropped and recorded again
    second = DynamicsCallback(tmp_path / "resumed", every=2)
    resumed, trainer = fit([second, AutoClipCallback(p=25)], max_steps=12, ckpt_path=step3)
    assert trainer.global_step == 12 and second.recorder.t == 12
    assert_equal_params(_params(whole), _params(resumed))
    a, b = tables_without_time(tmp_path / "whole"), tables_without_time(tmp_path / "resumed")
    assert list(b["steps"].step) == list(range(1, 13))
    assert b["steps"].clipped.any()
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def test_gradient_clip_val_with_autoclip_warns(tmp_path):
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        _fit(tmp_path, [AutoClipCallback(p=10)], max_steps=1, gradient_clip_val=1.0)


def test_probe_passes_do_not_log(tmp_path):
    logged = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(trainer.callback_metrics["train_loss"].item())

    oracle = Oracle()
    _fit(tmp_path, [DynamicsCallback(tmp_path / "run", every=1, probes=2), Spy(), oracle], max_steps=4)
    # the probes ran training_step again at other parameters; the logged loss is still the step's own
    np.testing.assert_array_equal(np.float32(logged), np.float32(oracle.losses))


class Boom(pl.Callback):
    """Raise inside fit() as step ``at`` + 1 begins, as a failing model or data loader would."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("boom")


def test_a_failed_fit_leaves_a_run_that_resumes_or_is_replaced(tmp_path):
    fit = lambda callbacks, **kw: _fit(tmp_path, callbacks, dropout=0.0, batches=3, max_steps=6, **kw)  # noqa: E731
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(RuntimeError, match="boom"):
        fit([DynamicsCallback(tmp_path / "run", every=2), saver, Boom(at=4)])
    (step3,) = (tmp_path / "ckpts").glob("*step=3.ckpt")
    resumed = DynamicsCallback(tmp_path / "run", every=2)
    fit([resumed, Boom(at=99)], ckpt_path=step3)
    assert list(load_run(tmp_path / "run").steps.step) == [1, 2, 3, 4, 5, 6] and resumed.recorder.t == 6
    # a first fit that fails before any checkpoint: the run cannot resume; overwrite=True replaces it
    with pytest.raises(RuntimeError, match="boom"):
        fit([DynamicsCallback(tmp_path / "early", every=2), Boom(at=1)])
    with pytest.raises(RunError, match="overwrite=True"):
        fit([DynamicsCallback(tmp_path / "early", every=2)])
    fit([DynamicsCallback(tmp_path / "early", every=2, overwrite=True)])
    assert list(load_run(tmp_path / "early").steps.step) == [1, 2, 3, 4, 5, 6]


def test_an_autoclip_twice_is_refused_rather_than_clipping_twice(tmp_path):
    twice = AutoClipCallback(p=25)
    for callbacks in ([twice, twice], [AutoClipCallback(p=25), AutoClipCallback(p=25)]):
        with pytest.raises(RuntimeError, match="more than one stateful callback of type `AutoClipCallback`"):
            _fit(tmp_path, callbacks, max_steps=1)  # Lightning's own check, before any step
    assert twice.clipper is None


class WrappedNet(Net):
    def configure_optimizers(self):
        return wrap(torch.optim.Adam(self.parameters(), lr=0.05), AutoClip(self.parameters(), p=25))


def test_autoclip_callback_on_an_optimizer_that_clips_already_is_refused(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path, callbacks=[AutoClipCallback(p=25)],
    )  # fmt: skip
    with pytest.raises(DynamicsError, match="clip every step twice"):
        trainer.fit(WrappedNet(), _loader(1))
