"""The built-in task's options: declared once, with their defaults, help and validation.

The command line builds its options from these declarations, so a default or a check lives
here alone. ``TaskOptions.checked()`` raises ValueError with one line saying what to change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LOSSES = ("mi", "dc", "wkm", "chimera", "snr")
MIN_SAMPLES = 256  # one STFT window
MAX_SEED = 2**63 - 1  # torch.manual_seed, numpy's generators and every int64 column take it
BUILT_IN_DATA = (None, "speech", "synthetic")


def option(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple | None = None,
    cli: bool = True,
):
    """A task option: its default, its help text and what values it takes."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "cli": cli}
    return field(default=default, metadata=meta)


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
    seed: int = option(0, "Seed of the model, the data order and the mixtures.", minimum=0, maximum=MAX_SEED)
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
    time_limit: float | None = option(
        None,
        "Minutes of training after which the run ends cleanly (final evaluation, finished) even before --steps; "
        "counted per process, so a resumed run gets the time again.",
    )

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
                raise ValueError(f"{flag} must be at least {meta['minimum']}, got {value!r}")
            if meta.get("maximum") is not None and value > meta["maximum"]:
                raise ValueError(f"{flag} must be in [{meta['minimum']}, {meta['maximum']}], got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ValueError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        chosen = [self.p is not None, self.clip_norm is not None, self.clip_value is not None, self.no_clip]
        if sum(chosen) > 1:
            raise ValueError("choose one of --p, --clip-norm, --clip-value, --no-clip")
        opts = replace(self, p=10.0) if not any(chosen) else self
        if opts.p is not None and not 0.0 <= opts.p <= 100.0:
            raise ValueError(f"--p must be in [0, 100], got {opts.p!r}")
        if opts.window is not None and opts.p is None:
            raise ValueError("--window needs --p (it sets AutoClip's history)")
        for name in ("clip_norm", "clip_value", "loss_scale", "lr", "time_limit"):
            value = getattr(opts, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        if opts.sharpness_every and opts.sharpness_every % opts.every:
            raise ValueError(
                f"--sharpness-every must be a multiple of --every ({opts.every}), got {opts.sharpness_every}"
            )
        if opts.fsdp and opts.nproc < 2:
            raise ValueError("--fsdp shards over processes: give --nproc 2 or more")
        return opts

    def check_environment(self, device: bool = True) -> None:
        """The device exists here (unless ``device=False``: a job that runs elsewhere) and the data is there
        and readable: checked before any run directory is made."""
        from dynamics.tasks.separation.data import check_data

        if device:
            check_device(self.device)
        check_data(self.data)

    def check_effective(self, given: Iterable[str]) -> None:
        """Refuse an option the user set (``given``: their names) that can never take effect given the others.

        Defaults and preset values are not checked: only what was asked for explicitly.
        """
        given = set(given)
        beyond = {
            "every": "no step would be recorded",
            "sharpness_every": "sharpness would never be measured",
            "eval_every": "only the final evaluation would run (that is --eval-every 0)",
            "checkpoint_every": "no checkpoint would be written before the end",
        }
        for name, consequence in beyond.items():
            value = getattr(self, name)
            if name in given and value and value > self.steps:
                raise ValueError(f"--{name.replace('_', '-')} {value} is beyond --steps {self.steps}: {consequence}")
        if "window" in given and self.window is not None and self.window >= self.steps:
            raise ValueError(
                f"--window {self.window} keeps at least as many gradient norms as --steps {self.steps} makes: "
                "it would never drop one (drop --window, or make it smaller)"
            )
        if "direction" in given and self.probes == 0:
            raise ValueError("--direction aims the smoothness probes, and --probes 0 turns them off: drop one")
        if self.data not in BUILT_IN_DATA:
            for name in ("train_mixtures", "eval_mixtures"):
                if name in given:
                    raise ValueError(
                        f"--{name.replace('_', '-')} sizes the built-in data; the folder {self.data} "
                        "brings its own mixtures: drop it"
                    )

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


def check_device(text: str) -> None:
    """``text`` names a torch device that holds data and is present on this machine; ValueError otherwise."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text}: not a torch device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "meta":
        raise ValueError("--device meta: meta tensors hold no values, so nothing can train there; use cpu or cuda")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        raise ValueError(f"--device {text}: no {device.type} device is available on this machine")
    count = getattr(getattr(torch, device.type, None), "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"--device {text}: this machine has {count()} {device.type} device(s), numbered from 0")
    try:
        torch.ones(1, device=device).add_(1).cpu()  # holds data, computes, comes back
    except (RuntimeError, AssertionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--device {text}: {reason[:200]}") from None


# Named sets of option values (``dyn record --preset NAME``); options given explicitly override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Fig. 1 (its Sec. 4.3 recipe on the smaller network): mask inference, 2 BLSTM layers of
    # 300 units, Adam at 1e-3, batch 25, 400-frame segments (25536 samples), recorded every 20 steps,
    # 100 epochs of WSJ0-2mix's 20000 training mixtures (80000 steps); its 3000 test mixtures held out.
    # Sharpness by finite-difference Hessian-vector products (cuDNN's LSTM has no double backward).
    "paper": {
        "loss": "mi",
        "layers": 2,
        "hidden": 300,
        "batch_size": 25,
        "n_samples": 25536,
        "lr": 1e-3,
        "train_mixtures": 20000,
        "steps": 80000,
        "every": 20,
        "eval_mixtures": 3000,
        "eval_every": 8000,
        "checkpoint_every": 1000,
        "sharpness_every": 2000,
        "device": "cuda",
    },
}


def with_preset(name: str | None, values: dict[str, Any], given: Iterable[str]) -> dict[str, Any]:
    """``values`` with preset ``name``'s entries in place of those not ``given`` explicitly."""
    if name is None:
        return dict(values)
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    given = set(given)
    return {**values, **{k: v for k, v in PRESETS[name].items() if k not in given}}


def declared_options() -> list[tuple[str, Any, dict[str, Any], Any]]:
    """(name, type, metadata, default) of every option the command line offers."""
    out = []
    for f in fields(TaskOptions):
        if f.metadata.get("cli"):
            default = f.default if f.default is not MISSING else None
            out.append((f.name, f.type, dict(f.metadata), default))
    return out
