"""The built-in task's options: declared once, with their defaults, help and validation.

The command line builds its options from these declarations, so a default or a check lives
here alone. ``TaskOptions.checked()`` raises ValueError with one line saying what to change.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LOSSES = ("mi", "dc", "wkm", "chimera", "snr")
MIN_SAMPLES = 256  # one STFT window


def option(default: Any, help: str, *, minimum: float | None = None, choices: tuple | None = None, cli: bool = True):
    """A task option: its default, its help text and what values it takes."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "choices": choices, "cli": cli})


@dataclass(frozen=True)
class TaskOptions:
    """Everything that defines a run of the built-in task (saved in config.json as ``task``).

    The defaults are sized for two CPU cores; the paper's Fig. 1 network is ``hidden=300``.
    """

    loss: str = option(
        "mi", "The paper's loss: mask inference, deep clustering, whitened k-means, Chimera, SNR.", choices=LOSSES
    )
    p: float | None = option(None, "AutoClip percentile in [0, 100] (default 10; 100: no clipping).")
    window: int | None = option(None, "AutoClip: keep only the last W gradient norms.", minimum=1)
    clip_norm: float | None = option(None, "Fixed clip-by-norm threshold instead of AutoClip.")
    clip_value: float | None = option(None, "Fixed clip-by-value bound instead of AutoClip.")
    no_clip: bool = option(False, "No clipping (the norm is still recorded).")
    loss_scale: float = option(1.0, "Multiply the loss (and Adam's eps) by a constant: the paper's footnote 2.")
    steps: int = option(6000, "Optimizer steps in all.", minimum=1)
    every: int = option(20, "Record every N steps.", minimum=1)
    probes: int = option(1, "Gradient probes per smoothness estimate (0: no smoothness).", minimum=0)
    direction: str = option(
        "update", "Probe along the actual update or along the gradient.", choices=("update", "gradient")
    )
    sharpness_every: int = option(
        0, "Also record sharpness (top Hessian eigenvalue) every N steps, a multiple of --every; 0: off.", minimum=0
    )
    seed: int = option(0, "Seed of the model, the data order and the mixtures.", minimum=0)
    data: str | None = option(
        "speech",
        "Training data: 'speech' (built-in eSpeak NG corpus), 'synthetic' (harmonic mixtures), "
        "or a WSJ0-2mix or Libri2Mix folder.",
    )
    layers: int = option(2, "BLSTM layers.", minimum=1)
    hidden: int = option(64, "BLSTM units per direction (paper: 300).", minimum=1)
    batch_size: int = option(8, "Mixtures per step (per process).", minimum=1)
    lr: float = option(1e-3, "Adam learning rate.")
    n_samples: int = option(
        4096, "Samples per training segment at 8 kHz (paper: 25536, i.e. 400 frames).", minimum=MIN_SAMPLES
    )
    train_mixtures: int = option(
        512, "Training mixtures per epoch (synthetic: how many exist; speech: mixed afresh every step).", minimum=1
    )
    eval_mixtures: int = option(64, "Held-out mixtures evaluated.", minimum=1)
    eval_every: int = option(1000, "Evaluate SI-SDR every N steps (0: only at the end).", minimum=0)
    checkpoint_every: int = option(200, "Write a checkpoint every N steps.", minimum=1)
    device: str = option("cpu", "torch device, e.g. cpu or cuda.")
    dtype: str = option("float32", "Floating-point type of the model.", choices=("float32", "float64"))
    record_layers: bool = option(True, "Record the per-layer table.", cli=False)
    nproc: int = option(1, "Processes to train on (torch.distributed, DDP); --batch-size is per process.", minimum=1)
    fsdp: bool = option(False, "With --nproc: shard with FSDP2 (fully_shard) instead of DDP.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskOptions:
        """Options from a config.json ``task`` entry (unknown keys ignored, missing ones default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def checked(self) -> TaskOptions:
        """These options with the clipper resolved (AutoClip p=10 by default), or ValueError saying what is wrong."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = f"--{f.name.replace('_', '-')}"
            if value is None:
                continue
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{flag} must be an integer, got {value!r}")
            if kind.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{flag} must be a finite number, got {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise ValueError(f"{flag} must be at least {meta['minimum']}, got {value}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ValueError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        chosen = [self.p is not None, self.clip_norm is not None, self.clip_value is not None, self.no_clip]
        if sum(chosen) > 1:
            raise ValueError("choose one of --p, --clip-norm, --clip-value, --no-clip")
        opts = replace(self, p=10.0) if not any(chosen) else self
        if opts.p is not None and not 0.0 <= opts.p <= 100.0:
            raise ValueError(f"--p must be in [0, 100], got {opts.p:g}")
        if opts.window is not None and opts.p is None:
            raise ValueError("--window needs --p (it sets AutoClip's history)")
        for name in ("clip_norm", "clip_value", "loss_scale", "lr"):
            value = getattr(opts, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
        if opts.sharpness_every and opts.sharpness_every % opts.every:
            raise ValueError(
                f"--sharpness-every must be a multiple of --every ({opts.every}), got {opts.sharpness_every}"
            )
        if opts.fsdp and opts.nproc < 2:
            raise ValueError("--fsdp shards over processes: give --nproc 2 or more")
        return opts

    def check_environment(self) -> None:
        """The device exists and the data is there and readable: checked before any run directory is made."""
        import torch

        from dynamics.tasks.separation.data import check_data

        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"--device {self.device}: {str(e).splitlines()[0]}") from None
        check_data(self.data)

    def clipper_name(self) -> str:
        if self.no_clip:
            return "none"
        if self.clip_norm is not None:
            return f"clip-norm {self.clip_norm:g}"
        if self.clip_value is not None:
            return f"clip-value {self.clip_value:g}"
        return f"autoclip p={self.p:g}"

    def make_clipper(self, params):
        """The one place the clipper is chosen from the options."""
        from autoclip import AutoClip, ClipNorm, ClipValue, NoClip

        if self.no_clip:
            return NoClip(params)
        if self.clip_norm is not None:
            return ClipNorm(params, self.clip_norm)
        if self.clip_value is not None:
            return ClipValue(params, self.clip_value)
        return AutoClip(params, p=self.p, window=self.window)

    def default_out(self, root: str | os.PathLike = "runs") -> Path:
        """runs/<clipper>, with -2, -3, ... added until the name is free."""
        if self.no_clip:
            stem = "noclip"
        elif self.clip_norm is not None:
            stem = f"clipnorm{self.clip_norm:g}"
        elif self.clip_value is not None:
            stem = f"clipvalue{self.clip_value:g}"
        else:
            stem = f"autoclip-p{self.p:g}"
        base = Path(root) / stem
        path, k = base, 1
        while path.exists():
            k += 1
            path = base.with_name(f"{stem}-{k}")
        return path

    def describe(self) -> str:
        """One line for ``dyn info``."""
        data = {None: "synthetic mixtures", "synthetic": "synthetic mixtures", "speech": "eSpeak NG speech"}.get(
            self.data, self.data
        )
        procs = f" x {self.nproc} processes ({'FSDP2' if self.fsdp else 'DDP'})" if self.nproc > 1 else ""
        return (
            f"separation, loss {self.loss}, BLSTM {self.layers}x{self.hidden}, batch {self.batch_size}{procs}, "
            f"{self.n_samples / 8000:g} s segments, {data}"
        )


def declared_options() -> list[tuple[str, Any, dict[str, Any], Any]]:
    """(name, type, metadata, default) of every option the command line offers."""
    out = []
    for f in fields(TaskOptions):
        if f.metadata.get("cli"):
            default = f.default if f.default is not MISSING else None
            out.append((f.name, f.type, dict(f.metadata), default))
    return out
