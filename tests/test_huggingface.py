"""The Hugging Face callbacks: recording leaves training unchanged, AutoClip thresholds, resume_from_checkpoint."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from dynamics import load_run  # noqa: E402
from dynamics.errors import DynamicsError  # noqa: E402
from dynamics.integrations.huggingface import AutoClipCallback, DynamicsCallback, RecordingTrainer  # noqa: E402
from dynamics.quantities import Quantity  # noqa: E402
from dynamics.run import RunError  # noqa: E402
from tests.helpers import assert_equal_params, tables_without_time  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, 50, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(dropout: float = 0.1):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=50,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(config)


class Oracle(transformers.TrainerCallback):
    """The norm of the gradients the optimizer is about to use, computed independently."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


class LossSpy(transformers.Trainer):
    """A plain Trainer that keeps every micro-batch's loss."""

    losses: list

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


def _train(tmp_path, callbacks, trainer_cls=transformers.Trainer, dropout=0.1, resume=None, **kw):
    args = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    args.update(kw)
    trainer = trainer_cls(
        model=_model(dropout), args=transformers.TrainingArguments(**args), train_dataset=Tokens(), callbacks=callbacks
    )
    if trainer_cls is LossSpy:
        trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_recording_leaves_training_unchanged(tmp_path):
    oracle = Oracle()
    plain = _train(tmp_path, [oracle], trainer_cls=LossSpy, gradient_accumulation_steps=2)
    with_mixin = _train(
        tmp_path,
        [DynamicsCallback(tmp_path / "mixin", every=2, probes=1)],
        RecordingTrainer,
        gradient_accumulation_steps=2,
    )
    with pytest.warns(UserWarning, match="RecordingTrainer"):
        without = _train(tmp_path, [DynamicsCallback(tmp_path / "plain", every=2)], gradient_accumulation_steps=2)
    assert_equal_params(_params(plain), _params(with_mixin))
    assert_equal_params(_params(plain), _params(without))
    run = load_run(tmp_path / "mixin")
    assert run.config["status"] == "finished"
    assert list(run.steps.step) == [1, 2, 3, 4]
    assert list(run.metrics.step) == [2, 4]
    micro = np.float32(plain.losses).astype(np.float64)  # already divided by the 2 accumulation steps
    np.testing.assert_allclose(run.steps.loss, micro[0::2] + micro[1::2], rtol=1e-6)
    np.testing.assert_allclose(run.steps.grad_norm, oracle.norms, rtol=1e-6)
    assert np.isfinite(run.metrics.smoothness).all() and (run.metrics.smoothness > 0).all()
    bare = load_run(tmp_path / "plain")
    assert bare.steps.loss.isna().all() and bare.metrics.smoothness.isna().all()
    np.testing.assert_allclose(bare.steps.grad_norm, oracle.norms, rtol=1e-6)
    assert (bare.metrics.step_size > 0).all()


class LossAgain(Quantity):
    """The step's loss re-evaluated by the callback's closure at θt−1 (the same dropout masks replayed)."""

    name = "loss_again"
    columns = {"loss_again": "float64"}

    def compute(self, ctx):
        if ctx.prober is None:
            return {"loss_again": ctx.nan()}
        with ctx.prober.at(ctx.before), torch.no_grad():
            return {"loss_again": ctx.closure().double()}


def test_closure_reevaluates_the_step_loss(tmp_path):
    dyn = DynamicsCallback(tmp_path / "run", every=1, quantities=[LossAgain()])
    _train(tmp_path, [dyn], RecordingTrainer, max_steps=3, gradient_accumulation_steps=2)
    metrics = load_run(tmp_path / "run").metrics
    assert list(metrics.step) == [1, 2, 3] and np.isfinite(metrics.loss_again).all()
    np.testing.assert_allclose(metrics.loss_again, metrics.loss, rtol=1e-6)


@pytest.mark.parametrize("dynamics_first", [True, False])
def test_autoclip_thresholds_with_dynamics_in_either_order(tmp_path, dynamics_first):
    alone = AutoClipCallback(p=25)
    reference = _train(tmp_path, [alone], max_steps=6)
    run_dir = tmp_path / "run"
    callbacks = [DynamicsCallback(run_dir, every=2, probes=1), AutoClipCallback(p=25)]
    recorded = _train(tmp_path, callbacks if dynamics_first else callbacks[::-1], RecordingTrainer, max_steps=6)
    assert_equal_params(_params(reference), _params(recorded))
    steps = load_run(run_dir).steps
    norms = steps.grad_norm.to_numpy()
    expected = [np.percentile(norms[: t + 1], 25) for t in range(len(norms))]
    np.testing.assert_array_equal(steps.threshold, expected)
    np.testing.assert_array_equal(steps.clipped, norms > np.asarray(expected))
    assert steps.clipped.any()
    assert sorted(alone.clipper.histories[0].values()) == sorted(norms)


def test_max_grad_norm_with_autoclip_warns(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm=0"):
        _train(tmp_path, [AutoClipCallback(p=10)], max_steps=1, max_grad_norm=1.0)


def test_resume_from_checkpoint_records_every_step_once(tmp_path):
    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                control.should_training_stop = True

    common = dict(max_steps=8, gradient_accumulation_steps=1)
    whole = _train(
        tmp_path / "a", [DynamicsCallback(tmp_path / "whole", every=2, probes=1), AutoClipCallback(p=25)],
        RecordingTrainer, **common,
    )  # fmt: skip
    saving = dict(save_strategy="steps", save_steps=3, output_dir=str(tmp_path / "b"), **common)
    first = DynamicsCallback(tmp_path / "resumed", every=2, probes=1, finish=False)
    _train(tmp_path, [first, AutoClipCallback(p=25), StopAt()], RecordingTrainer, **saving)
    assert list(load_run(tmp_path / "resumed").steps.step) == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "checkpoint-3" / "dynamics_recorder.pt").exists()
    with pytest.raises(RunError, match="every=2"):  # another schedule would mix two in one table
        _train(
            tmp_path, [DynamicsCallback(tmp_path / "resumed", every=3), AutoClipCallback(p=25)], RecordingTrainer,
            resume=str(tmp_path / "b" / "checkpoint-3"), **saving,
        )  # fmt: skip
    damaged = shutil.copytree(tmp_path / "b" / "checkpoint-3", tmp_path / "damaged")
    (damaged / "dynamics_recorder.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DynamicsError, match="damaged"):
        _train(
            tmp_path, [DynamicsCallback(tmp_path / "resumed", every=2)], RecordingTrainer, resume=str(damaged), **saving
        )
    # resume from step 3: the rows of steps 4-6 are dropped and recorded again
    second = DynamicsCallback(tmp_path / "resumed", every=2, probes=1)
    resumed = _train(
        tmp_path, [second, AutoClipCallback(p=25)], RecordingTrainer, resume=str(tmp_path / "b" / "checkpoint-3"),
        **saving,
    )  # fmt: skip
    assert second.recorder.t == 8
    assert_equal_params(_params(whole), _params(resumed))
    a, b = tables_without_time(tmp_path / "whole"), tables_without_time(tmp_path / "resumed")
    assert list(b["steps"].step) == list(range(1, 9))
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


class Boom(transformers.TrainerCallback):
    """Raise inside train() as the step after ``at`` begins, as a failing model or data loader would."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise RuntimeError("boom")


@pytest.mark.filterwarnings("ignore:DynamicsCallback on a plain")
@pytest.mark.parametrize("trainer_cls", [RecordingTrainer, transformers.Trainer])
def test_a_run_a_failed_train_left_is_resumed_by_a_new_trainer_in_the_same_process(tmp_path, trainer_cls):
    saving = dict(max_steps=6, save_strategy="steps", save_steps=2)
    first = DynamicsCallback(tmp_path / "run", every=2, finish=False)  # kept alive, as in a notebook
    with pytest.raises(RuntimeError, match="boom"):
        _train(tmp_path, [first, Boom(at=3)], trainer_cls, **saving)
    assert load_run(tmp_path / "run").config["status"] == "running"
    second = DynamicsCallback(tmp_path / "run", every=2)
    _train(tmp_path, [second], trainer_cls, resume=str(tmp_path / "out" / "checkpoint-2"), **saving)
    run = load_run(tmp_path / "run")
    assert run.config["status"] == "finished" and second.recorder.t == 6
    assert list(run.steps.step) == [1, 2, 3, 4, 5, 6] and list(run.metrics.step) == [2, 4, 6]


def test_a_run_whose_first_train_failed_before_any_checkpoint_is_replaced_with_overwrite(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _train(tmp_path, [DynamicsCallback(tmp_path / "run", every=2), Boom(at=3)], RecordingTrainer)
    with pytest.raises(RunError, match="overwrite=True"):
        _train(tmp_path, [DynamicsCallback(tmp_path / "run", every=2)], RecordingTrainer)
    _train(tmp_path, [DynamicsCallback(tmp_path / "run", every=2, overwrite=True)], RecordingTrainer)
    run = load_run(tmp_path / "run")
    assert run.config["status"] == "finished" and list(run.steps.step) == [1, 2, 3, 4]


def test_the_same_autoclip_passed_twice_clips_each_step_once(tmp_path):
    reference = _train(tmp_path, [AutoClipCallback(p=25)], max_steps=6)
    twice = AutoClipCallback(p=25)
    trained = _train(tmp_path, [twice, twice], max_steps=6)
    assert_equal_params(_params(reference), _params(trained))
    assert twice.clipper.steps == 6 and len(twice.clipper.histories[0].values()) == 6
