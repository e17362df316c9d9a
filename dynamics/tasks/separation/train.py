"""The built-in trainer: the paper's separation networks (any of its five losses), recorded by a Recorder."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoclip import AutoClip, ClipNorm, Clipper, ClipValue, NoClip
from dynamics import distributed
from dynamics.recorder import Recorder
from dynamics.tasks.separation.data import datasets
from dynamics.tasks.separation.losses import separation_loss
from dynamics.tasks.separation.metrics import pit_si_sdr, si_sdr
from dynamics.tasks.separation.model import SeparationNet, Stft, estimate_sources


@dataclass
class TaskOptions:
    """Everything that defines a run of the built-in task (saved in config.json as ``task``).

    The defaults are sized for two CPU cores; the paper's Fig. 1 network is ``hidden=300``.
    """

    loss: str = "mi"  # the paper's losses: mi, dc, wkm, chimera, snr
    loss_scale: float = 1.0
    steps: int = 6000
    every: int = 20
    probes: int = 1
    direction: str = "update"
    seed: int = 0
    p: float | None = 10.0  # AutoClip percentile; None with clip_norm / clip_value / no_clip
    window: int | None = None
    clip_norm: float | None = None
    clip_value: float | None = None
    no_clip: bool = False
    layers: int = 2
    hidden: int = 64
    batch_size: int = 8
    lr: float = 1e-3
    n_samples: int = 4096  # 0.512 s segments at 8 kHz: 65 STFT frames
    train_mixtures: int = 512
    eval_mixtures: int = 64
    eval_every: int = 1000
    checkpoint_every: int = 200
    data: str | None = None  # a WSJ0-2mix folder; None: synthetic mixtures
    device: str = "cpu"
    dtype: str = "float32"  # or "float64", for runs compared to rounding error
    record_layers: bool = True
    nproc: int = 1  # processes (torch.distributed); batch_size is per process
    fsdp: bool = False  # FSDP2 fully_shard instead of DistributedDataParallel

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def clipper_name(self) -> str:
        if self.no_clip:
            return "none"
        if self.clip_norm is not None:
            return f"clip-norm {self.clip_norm:g}"
        if self.clip_value is not None:
            return f"clip-value {self.clip_value:g}"
        return f"autoclip p={self.p:g}"


def make_clipper(opts: TaskOptions, params) -> Clipper:
    if opts.no_clip:
        return NoClip(params)
    if opts.clip_norm is not None:
        return ClipNorm(params, opts.clip_norm)
    if opts.clip_value is not None:
        return ClipValue(params, opts.clip_value)
    return AutoClip(params, p=opts.p, window=opts.window)


def init_distributed(opts: TaskOptions) -> None:
    """Join the process group torchrun set up (WORLD_SIZE > 1), on gloo for CPU, NCCL for CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    cuda = opts.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")


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


def record(
    opts: TaskOptions,
    out: str | Path,
    resume: bool = False,
    progress: Callable[[int, float, float], None] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Train the built-in task for ``opts.steps`` steps, recording into ``out``.

    ``progress(t, loss, threshold)`` is called after every step (for a progress bar).
    With ``resume=True`` the run continues from its checkpoint, exactly.
    """
    init_distributed(opts)
    torch.manual_seed(opts.seed)
    task = SeparationTask(opts)
    # Adam's eps scales with the loss, so a scaled loss trains the same model, only its
    # gradients (and so AutoClip's history) scaled: the paper's footnote 2, exactly.
    optimizer = torch.optim.Adam(task.model.parameters(), lr=opts.lr, eps=1e-8 * opts.loss_scale)
    clipper = make_clipper(opts, task.model.parameters())
    rec = Recorder(
        task.model,
        optimizer,
        out,
        clipper=clipper,
        every=opts.every,
        probes=opts.probes,
        direction=opts.direction,
        layers=opts.record_layers,
        resume=resume,
        config={"task": asdict(opts), "name": Path(out).name, **(config or {})},
    )
    # Every journal write is flushed as it happens: an exception or a kill loses nothing more
    # than the write in progress, and the run resumes from its last checkpoint.
    if not resume:
        rec.checkpoint()  # step 0: a run killed before its first checkpoint still resumes
    while rec.t < opts.steps:
        t = rec.t + 1
        loss = rec.step(task.closure(t), epoch=task.epoch_of(t))
        if opts.eval_every and t % opts.eval_every == 0:
            rec.log_eval(**task.evaluate())
        if progress is not None:
            progress(t, loss, rec.last_info.threshold)
        if t % opts.checkpoint_every == 0 and t < opts.steps:
            rec.checkpoint()
    if not opts.eval_every or opts.steps % opts.eval_every:
        rec.log_eval(**task.evaluate())
    rec.close()
    if distributed.active():
        torch.distributed.destroy_process_group()
    return Path(out)
