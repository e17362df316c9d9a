"""``dyn record``: train the built-in separation task and record its dynamics."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cli.errors import EXIT_BAD_INPUT, fail


def _default_out(p, clip_norm, clip_value, no_clip) -> Path:
    if no_clip:
        stem = "noclip"
    elif clip_norm is not None:
        stem = f"clipnorm{clip_norm:g}"
    elif clip_value is not None:
        stem = f"clipvalue{clip_value:g}"
    else:
        stem = f"autoclip-p{p:g}"
    base = Path("runs") / stem
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{stem}-{k}")
    return path


LOSSES = ("mi", "dc", "wkm", "chimera", "snr")

# Options of the built-in task that `dyn record` and `dyn sweep` share (the sweep passes them on).
TRAINING_OPTIONS = [
    click.option(
        "--loss-scale",
        type=float,
        default=1.0,
        show_default=True,
        help="Multiply the loss (and Adam's eps) by a constant: the paper's footnote 2.",
    ),
    click.option("--window", type=int, default=None, help="AutoClip: keep only the last W gradient norms."),
    click.option("--steps", type=int, default=6000, show_default=True, help="Optimizer steps in all."),
    click.option("--every", type=int, default=20, show_default=True, help="Record every N steps."),
    click.option("--probes", type=int, default=1, show_default=True, help="Gradient probes per smoothness estimate."),
    click.option(
        "--direction",
        type=click.Choice(["update", "gradient"]),
        default="update",
        show_default=True,
        help="Probe along the actual update or along the gradient.",
    ),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option(
        "--data",
        type=click.Path(path_type=Path),
        default=None,
        help="A WSJ0-2mix folder (mix/, s1/, s2/); default: synthetic mixtures.",
    ),
    click.option("--layers", type=int, default=2, show_default=True, help="BLSTM layers."),
    click.option("--hidden", type=int, default=64, show_default=True, help="BLSTM units per direction (paper: 300)."),
    click.option("--batch-size", type=int, default=8, show_default=True, help="Mixtures per step (per process)."),
    click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate."),
    click.option(
        "--n-samples",
        type=int,
        default=4096,
        show_default=True,
        help="Samples per training segment at 8 kHz (paper: 25536, i.e. 400 frames).",
    ),
    click.option("--eval-every", type=int, default=1000, show_default=True, help="Evaluate SI-SDR every N steps."),
    click.option("--checkpoint-every", type=int, default=200, show_default=True),
    click.option("--train-mixtures", type=int, default=512, show_default=True, help="Synthetic training mixtures."),
    click.option("--eval-mixtures", type=int, default=64, show_default=True, help="Synthetic held-out mixtures."),
    click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda."),
    click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True),
    click.option(
        "--threads",
        type=int,
        default=1,
        show_default=True,
        help="torch CPU threads (one is fastest for the small default network).",
    ),
]
TRAINING_NAMES = [o(lambda: None).__click_params__[0].name for o in TRAINING_OPTIONS]


def training_options(command):
    for option in reversed(TRAINING_OPTIONS):
        command = option(command)
    return command


def check_training(kw: dict) -> None:
    """One line and exit code 2 for any bad training option."""
    positive = (
        "steps",
        "every",
        "layers",
        "hidden",
        "batch_size",
        "checkpoint_every",
        "train_mixtures",
        "eval_mixtures",
        "threads",
    )
    for name in positive:
        if kw[name] < 1:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {kw[name]}")
    if kw["probes"] < 0 or kw["eval_every"] < 0:
        fail("--probes and --eval-every must be >= 0")
    if not kw["lr"] > 0:
        fail(f"--lr must be positive, got {kw['lr']:g}")
    if not kw["loss_scale"] > 0:
        fail(f"--loss-scale must be positive, got {kw['loss_scale']:g}")
    if kw["window"] is not None and kw["window"] < 1:
        fail("--window must be a positive size")
    data = kw["data"]
    if data is not None:
        for sub in ("mix", "s1", "s2"):
            if not (data / sub).is_dir() and not (data / "tr" / sub).is_dir():
                fail(f"--data {data}: not a WSJ0-2mix folder (no {sub}/ inside)")
    _device_ok(kw["device"])


def task_options(kw: dict, **more):
    from dynamics.tasks.separation.train import TaskOptions

    settings = {k: v for k, v in kw.items() if k in TRAINING_NAMES and k != "threads"}
    settings["data"] = str(settings["data"]) if settings["data"] is not None else None
    return TaskOptions(**settings, **more)


@click.command("record")
@click.option(
    "--p", "p", type=float, default=None, help="AutoClip percentile in [0, 100] (default 10; 100: no clipping)."
)
@click.option("--clip-norm", type=float, default=None, help="Fixed clip-by-norm threshold instead of AutoClip.")
@click.option("--clip-value", type=float, default=None, help="Fixed clip-by-value bound instead of AutoClip.")
@click.option("--no-clip", is_flag=True, help="No clipping (the norm is still recorded).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default runs/<clipper>).")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the run in this directory from its checkpoint.",
)
@click.option(
    "--loss",
    type=click.Choice(LOSSES),
    default="mi",
    show_default=True,
    help="The paper's loss: mask inference, deep clustering, whitened k-means, Chimera, SNR.",
)
@training_options
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="Processes to train on (torch.distributed, DDP); --batch-size is per process.",
)
@click.option("--fsdp", is_flag=True, help="With --nproc: shard with FSDP2 (fully_shard) instead of DDP.")
def record(p, clip_norm, clip_value, no_clip, out, resume_dir, loss, nproc, fsdp, **kw):
    """Train the built-in separation task and record its dynamics into a run directory."""
    if kw["threads"] < 1:
        fail(f"--threads must be a positive integer, got {kw['threads']}")
    if nproc < 1:
        fail(f"--nproc must be a positive integer, got {nproc}")
    if resume_dir is not None:
        return _resume(resume_dir, kw["threads"])
    chosen = [p is not None, clip_norm is not None, clip_value is not None, no_clip]
    if sum(chosen) > 1:
        fail("choose one of --p, --clip-norm, --clip-value, --no-clip")
    if p is None and not any(chosen):
        p = 10.0
    if p is not None and not 0.0 <= p <= 100.0:
        fail(f"--p must be in [0, 100], got {p:g}")
    if kw["window"] is not None and p is None:
        fail("--window needs --p")
    if clip_norm is not None and clip_norm <= 0 or clip_value is not None and clip_value <= 0:
        fail("--clip-norm and --clip-value must be positive")
    check_training(kw)
    out = out if out is not None else _default_out(p, clip_norm, clip_value, no_clip)
    if _in_worker():
        nproc = int(os.environ["WORLD_SIZE"])  # torchrun decides; the parent checked the rest
    elif (out / "config.json").exists():
        fail(f"--out {out} already holds a run: use --resume {out} to continue it, or choose another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out} exists and is not an empty directory")
    opts = task_options(
        kw, loss=loss, p=p, clip_norm=clip_norm, clip_value=clip_value, no_clip=no_clip, nproc=nproc, fsdp=fsdp
    )
    if nproc > 1 and not _in_worker():
        return _launch(nproc, ["--out", str(out)])
    _run(opts, out, resume=False, threads=kw["threads"])


def _device_ok(device: str) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {device}: {str(e).splitlines()[0]}")


def _resume(run_dir: Path, threads: int) -> None:
    from dynamics.run import RunError, read_config
    from dynamics.tasks.separation.train import TaskOptions

    try:
        config = read_config(run_dir)
    except RunError as e:
        fail(str(e))
    if config.get("status") == "finished":
        fail(f"{run_dir} is a finished run: nothing to resume")
    if "task" not in config:
        fail(f"{run_dir} was not recorded by dyn record: resume it from your own script")
    if not (run_dir / "checkpoint.pt").exists():
        fail(f"{run_dir} has no checkpoint yet: nothing to resume from")
    opts = TaskOptions.from_dict(config["task"])
    if opts.nproc > 1 and not _in_worker():
        return _launch(opts.nproc, [])
    _run(opts, run_dir, resume=True, threads=threads)


def _in_worker() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _die_with_launcher() -> None:
    """torchrun starts workers in sessions of their own, so killing the launcher would leave them
    running, still writing the run. Ask Linux to kill this worker when its launcher dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before the request
        os._exit(1)


def _launch(nproc: int, extra: list[str]) -> None:
    """Run this same command on ``nproc`` local processes (torchrun --standalone), exiting with their code."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "cli", *sys.argv[1:], *extra)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        sys.exit(EXIT_BAD_INPUT if EXIT_BAD_INPUT in codes else max(codes, default=1))


def _run(opts, out: Path, resume: bool, threads: int) -> None:
    if _in_worker():
        _die_with_launcher()
    import torch
    from tqdm import tqdm

    from dynamics.run import RunError
    from dynamics.tasks.separation.train import record as record_task

    torch.set_num_threads(threads)
    bar = tqdm(
        total=opts.steps,
        desc=f"{opts.clipper_name()}",
        unit="step",
        file=sys.stderr,
        disable=not sys.stderr.isatty() or int(os.environ.get("RANK", "0")) != 0,
        dynamic_ncols=True,
    )

    def progress(t: int, loss, threshold: float) -> None:
        if bar.disable:
            return
        if bar.n == 0 and t > 1:
            bar.update(t - 1)
        bar.update(1)
        if t % 20 == 0 or t == opts.steps:
            bar.set_postfix(loss=f"{loss.item():.4g}", threshold=f"{threshold:.4g}", refresh=False)

    try:
        record_task(opts, out, resume=resume, progress=progress, config={"command": sys.argv})
    except (RunError, ValueError) as e:
        fail(str(e))
    finally:
        bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(out))
