"""The built-in trainer: the paper's separation networks (any of its five losses), recorded by a Recorder."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynamics import distributed
from dynamics.launch import init_distributed
from dynamics.quantities import Sharpness
from dynamics.recorder import Recorder
from dynamics.tasks.separation.data import datasets
from dynamics.tasks.separation.losses import separation_loss
from dynamics.tasks.separation.metrics import pit_si_sdr, si_sdr
from dynamics.tasks.separation.model import SeparationNet, Stft, estimate_sources
from dynamics.tasks.separation.options import TaskOptions

__all__ = ["SeparationTask", "TaskOptions", "record"]


class SeparationTask:
    """Data, model and loss of the built-in task; batches are a pure function of the step.

    Under torch.distributed each rank takes its own slice of every global batch of
    ``batch_size x world`` mixtures, so N processes with batch B see what one process
    with batch N x B sees.
    """

    def __init__(self, opts: TaskOptions):
        self.opts = opts
        self.rank, self.world = distributed.rank(), distributed.world()
        device = opts.device
        if device.startswith("cuda") and self.world > 1:
            device = f"cuda:{torch.cuda.current_device()}"
        self.device = torch.device(device)
        self.dtype = getattr(torch, opts.dtype)
        self.train_set, self.eval_set = datasets(
            opts.data, opts.seed, opts.n_samples, opts.train_mixtures, opts.eval_mixtures
        )
        self.global_batch = opts.batch_size * self.world
        if len(self.train_set) < self.global_batch:
            raise ValueError(f"{len(self.train_set)} training mixtures are fewer than one batch of {self.global_batch}")
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        torch.manual_seed(opts.seed)
        self.stft = Stft().to(self.device, self.dtype)
        self.module = SeparationNet(opts.loss, hidden=opts.hidden, layers=opts.layers).to(self.device, self.dtype)
        self.model = self._parallel(self.module)  # what training calls: the module, or its DDP wrapper

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return module
        if self.opts.fsdp:
            from torch.distributed.fsdp import fully_shard

            for child in module.children():
                fully_shard(child)
            return fully_shard(module)
        return torch.nn.parallel.DistributedDataParallel(module)

    def epoch_of(self, t: int) -> int:
        return (t - 1) // self.steps_per_epoch

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture and source STFTs, and source waveforms, of step t's batch (t counts from 1)."""
        epoch, position = divmod(t - 1, self.steps_per_epoch)
        order = np.random.default_rng([self.opts.seed, 2, epoch]).permutation(len(self.train_set))
        batch = order[position * self.global_batch :][: self.global_batch]
        mine = range(self.rank * self.opts.batch_size, (self.rank + 1) * self.opts.batch_size)
        # each item's crop depends on its place in the global batch, not on which rank loads it
        items = [self.train_set.segment(int(batch[j]), np.random.default_rng([self.opts.seed, 3, t, j])) for j in mine]
        mix = torch.from_numpy(np.stack([m for m, _ in items])).to(self.device, self.dtype)
        src = torch.from_numpy(np.stack([s for _, s in items])).to(self.device, self.dtype)
        return self.stft(mix), self.stft(src), src

    def closure(self, t: int) -> Callable[[], torch.Tensor]:
        """The forward pass of step t: the chosen loss (times ``loss_scale``) on its batch."""
        mix_spec, src_spec, src_wav = self.batch(t)
        mix_mag = mix_spec.abs()
        name, scale = self.opts.loss, self.opts.loss_scale

        def loss() -> torch.Tensor:
            value = separation_loss(name, self.model(mix_mag), mix_spec, src_spec, src_wav, self.stft)
            return value * scale if scale != 1.0 else value

        return loss

    @torch.no_grad()
    def evaluate(self, batch_size: int = 16) -> dict[str, float]:
        """SI-SDR and SI-SDR improvement (dB) on the held-out mixtures, with PIT (every rank alike)."""
        self.module.eval()
        crop = np.random.default_rng([self.opts.seed, 4])
        scores, baseline = [], []
        for start in range(0, len(self.eval_set), batch_size):
            items = [self.eval_set.segment(i, crop) for i in range(start, min(start + batch_size, len(self.eval_set)))]
            mix = torch.from_numpy(np.stack([m for m, _ in items])).to(self.device, self.dtype)
            src = torch.from_numpy(np.stack([s for _, s in items])).to(self.device, self.dtype)
            spec = self.stft(mix)
            outputs = self.module(spec.abs())
            estimates = estimate_sources(self.opts.loss, outputs, spec, self.stft, mix.shape[-1])
            scores.append(pit_si_sdr(estimates, src))
            baseline.append(si_sdr(mix.unsqueeze(1).expand_as(src), src).mean(1))
        self.module.train()
        score, base = torch.cat(scores).mean().item(), torch.cat(baseline).mean().item()
        return {"si_sdr": score, "si_sdri": score - base}


class TimeLimit:
    """``minutes`` of wall-clock time from now (None: no limit), agreed on by every rank.

    Under torch.distributed rank 0's clock decides, broadcast each step, so that all ranks stop
    after the same step (a rank that stopped alone would leave the others waiting in a collective).
    """

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes

    def reached(self) -> bool:
        if self.end is None:
            return False
        return bool(distributed.broadcast(time.monotonic() >= self.end))


def record(
    opts: TaskOptions,
    out: str | Path,
    resume: bool = False,
    progress: Callable[[int, float, float], None] | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the built-in task for ``opts.steps`` steps (or until ``opts.time_limit`` minutes), recording into ``out``.

    ``progress(t, loss, threshold)`` is called after every step (for a progress bar).
    With ``resume=True`` the run continues from its checkpoint, exactly (or restarts in
    place from step 0 if it never reached one). ``overwrite`` replaces a dead run in ``out``.
    """
    opts = opts.checked()
    init_distributed(opts.device)
    torch.manual_seed(opts.seed)
    task = SeparationTask(opts)
    # Adam's eps scales with the loss, so a scaled loss trains the same model, only its
    # gradients (and so AutoClip's history) scaled: the paper's footnote 2, exactly.
    optimizer = torch.optim.Adam(task.model.parameters(), lr=opts.lr, eps=1e-8 * opts.loss_scale)
    quantities = Recorder.default_quantities(layers=opts.record_layers)
    if opts.sharpness_every:
        # finite differences: no double backward, so it runs on cuDNN's LSTM and under DDP
        quantities.append(Sharpness(every=opts.sharpness_every, hvp="fd"))
    rec = Recorder(
        task.model,
        optimizer,
        out,
        clipper=opts.make_clipper(task.model.parameters()),
        every=opts.every,
        probes=opts.probes,
        direction=opts.direction,
        resume=resume,
        overwrite=overwrite,
        quantities=quantities,
        config={
            "task": opts.to_dict(),
            "task_description": opts.describe(),
            "eval_metric": "si_sdri",  # the headline of the eval table, for figures that show one
            "name": Path(out).name,
            **(config or {}),
        },
    )
    # Every journal write is flushed as it happens: an exception or a kill loses nothing more
    # than the write in progress, and the run resumes from its last checkpoint.
    if rec.t == 0:
        rec.checkpoint()  # step 0: a run killed before its first checkpoint still resumes
    deadline = TimeLimit(opts.time_limit)
    while rec.t < opts.steps and not deadline.reached():
        t = rec.t + 1
        loss = rec.step(task.closure(t), epoch=task.epoch_of(t))
        if opts.eval_every and t % opts.eval_every == 0:
            rec.log_eval(**task.evaluate())
        if progress is not None:
            progress(t, loss, rec.last_info.threshold)
        if t % opts.checkpoint_every == 0 and t < opts.steps:
            rec.checkpoint()
    if rec.last_eval_step != rec.t:  # once, even if a kill during closing left it in the journal
        rec.log_eval(**task.evaluate())
    rec.close()
    if distributed.active():
        # every rank waits for rank 0 to finish closing the run before any tears its process group
        # down: a gloo rank that destroyed its group while rank 0 still wrote aborted at exit
        # (SIGABRT, "terminate called without an active exception") about one run in eight, and
        # torchrun then stopped the other node too
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return Path(out)
