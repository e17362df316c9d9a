"""``dyn record``: train the built-in separation task and record its dynamics.

The options, their defaults and their checks are the task's own (TaskOptions); this file
only turns them into click options and errors into one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cli.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, environment_failure, fail


def _click_type(annotation):
    """click type of a TaskOptions field annotation such as 'int', 'float | None', 'str'."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    base = text.split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def task_options(exclude: tuple[str, ...] = ()):
    """Decorator adding a click option for every option the task declares (minus ``exclude``)."""
    from dynamics.tasks.separation.options import declared_options

    def decorate(command):
        for name, annotation, meta, default in reversed(declared_options()):
            if name in exclude:
                continue
            flag = f"--{name.replace('_', '-')}"
            kind = _click_type(annotation)
            if kind is bool:
                command = click.option(flag, name, is_flag=True, default=default, help=meta["help"])(command)
                continue
            if meta["choices"]:
                kind = click.Choice(meta["choices"])
            show = default is not None
            command = click.option(flag, name, type=kind, default=default, show_default=show, help=meta["help"])(
                command
            )
        return command

    return decorate


def given_options(ctx: click.Context, names) -> list[str]:
    """The options of ``names`` the user set on the command line (not left at their default)."""
    from click.core import ParameterSource

    return [n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]


def check_out(out: Path, force: bool = False) -> None:
    """``--out`` must be free (or an empty folder) and creatable: checked before anything is made.

    With ``force`` a run already there is left to the Recorder, which replaces it unless it is live."""
    from dynamics.run import RunError, check_new_run_dir

    if force and (out / "config.json").exists():
        return
    try:
        check_new_run_dir(out)
    except RunError as e:
        fail(f"--out {e}")


def resolved_options(ctx: click.Context, kw: dict, preset: str | None):
    """TaskOptions from the command line: ``preset`` under the given options, checked; one line if wrong."""
    from dynamics.tasks.separation.options import TaskOptions, with_preset

    given = given_options(ctx, kw)
    try:
        opts = TaskOptions(**with_preset(preset, kw, given)).checked()
        opts.check_effective(given)
    except ValueError as e:
        fail(str(e))
    return opts


class Nodes:
    """``--nnodes`` and the rendezvous that joins them (torch elastic, c10d), as checked options."""

    def __init__(self, ctx: click.Context, nnodes: int, endpoint: str | None, timeout: float):
        self.count, self.endpoint, self.timeout = nnodes, endpoint, timeout
        if nnodes < 1:
            fail(f"--nnodes must be a positive integer, got {nnodes}")
        if not timeout > 0 or timeout == float("inf"):
            fail(f"--rdzv-timeout must be a positive number of seconds, got {timeout!r}")
        if nnodes == 1:
            extra = given_options(ctx, ["rdzv_endpoint", "rdzv_timeout"])
            if extra:
                flags = ", ".join(f"--{n.replace('_', '-')}" for n in extra)
                fail(f"{flags}: for several nodes only: give --nnodes 2 or more, or drop {flags}")
        elif endpoint is None:
            fail("--nnodes needs --rdzv-endpoint HOST:PORT, the same on every node (e.g. the first node's name)")
        elif not _is_endpoint(endpoint):
            fail(f"--rdzv-endpoint must be HOST:PORT with a port in [1, 65535], got {endpoint!r}")

    @property
    def several(self) -> bool:
        return self.count > 1


def _is_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)


@click.command("record")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default runs/<clipper>).")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the run in this directory from its checkpoint, with the options it was started with.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the run in --out if nobody records it any more (one that crashed); a live run is refused.",
)
@click.option(
    "--threads", type=int, default=1, show_default=True, help="torch CPU threads (one is fastest for the small net)."
)
@click.option(
    "--preset",
    type=click.Choice(["paper"]),
    default=None,
    help="Start from a named set of options ('paper': the paper's Fig. 1 sizes on CUDA); options given win.",
)
@click.option(
    "--nnodes",
    type=int,
    default=1,
    show_default=True,
    help="Machines to train on together: run the same command on each (with --rdzv-endpoint); "
    "--nproc processes per machine.",
)
@click.option(
    "--rdzv-endpoint", default=None, help="With --nnodes: HOST:PORT where the nodes meet (torch elastic c10d)."
)
@click.option(
    "--rdzv-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="With --nnodes: seconds to wait for every node to join.",
)
@task_options()
@click.pass_context
def record(ctx, out, resume_dir, force, threads, preset, nnodes, rdzv_endpoint, rdzv_timeout, **kw):
    """Train the built-in separation task and record its dynamics into a run directory."""
    from dynamics.launch import in_worker, quiet_cpp_logs

    if nnodes > 1 and not in_worker():
        quiet_cpp_logs()  # this process only waits for the other nodes, then for its workers
    if threads < 1:
        fail(f"--threads must be a positive integer, got {threads}")
    nodes = Nodes(ctx, nnodes, rdzv_endpoint, rdzv_timeout)
    if resume_dir is not None and force:
        fail("--force replaces a run and --resume continues one: give one of them")
    if resume_dir is not None:
        given = given_options(ctx, [*kw, "out", "preset"])
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            fail(f"--resume continues a run with the options it was started with: drop {flags}")
        return _resume(resume_dir, threads, nodes)
    opts = resolved_options(ctx, kw, preset)
    if not in_worker():
        try:
            opts.check_environment()
        except ValueError as e:
            fail(str(e))
    out = out if out is not None else opts.default_out()
    if not in_worker():  # torchrun decides in workers; the parent checked the rest
        check_out(out, force)
    if (opts.nproc > 1 or nodes.several) and not in_worker():
        # workers get the run directory chosen here (a default one could be taken by then)
        return _launch(opts.nproc, nodes, [] if given_options(ctx, ["out"]) else ["--out", str(out)])
    _run(opts, out, resume=False, threads=threads, preset=preset, overwrite=force)


def _resume(run_dir: Path, threads: int, nodes: Nodes) -> None:
    from dynamics.launch import in_worker
    from dynamics.run import RunError, read_config
    from dynamics.tasks.separation.options import TaskOptions

    try:
        config = read_config(run_dir)
    except RunError as e:
        fail(str(e))
    if config.get("status") == "finished":
        fail(f"{run_dir} is a finished run: nothing to resume")
    if not isinstance(config.get("task"), dict):
        fail(f"{run_dir} was not recorded by dyn record: resume it from your own script")
    try:
        opts = TaskOptions.from_dict(config["task"]).checked()
        if not in_worker():
            opts.check_environment()
    except (TypeError, ValueError) as e:
        fail(f"{run_dir}/config.json: {e}")
    world = config.get("world_size", 1)
    if not in_worker() and isinstance(world, int) and world != opts.nproc * nodes.count:
        nnodes = max(1, world // opts.nproc)
        how = "without --nnodes" if nnodes == 1 else f"--nnodes {nnodes} with --rdzv-endpoint, on every node"
        fail(f"{run_dir} was recorded on {world} processes ({opts.nproc} per node): resume it on as many ({how})")
    if (opts.nproc > 1 or nodes.several) and not in_worker():
        return _launch(opts.nproc, nodes, [])
    _run(opts, run_dir, resume=True, threads=threads)


def _launch(nproc: int, nodes: Nodes, extra: list[str]) -> None:
    from dynamics.launch import RendezvousFailed, launch

    try:
        codes = launch(
            nproc,
            ["-m", "cli", *sys.argv[1:], *extra],
            nnodes=nodes.count,
            endpoint=nodes.endpoint,
            timeout=nodes.timeout,
        )
    except RendezvousFailed as e:
        click.echo(f"dyn: error: {e}", err=True)
        sys.exit(EXIT_ENVIRONMENT)
    if any(codes):
        sys.exit(EXIT_BAD_INPUT if EXIT_BAD_INPUT in codes else max(codes))


def _run(opts, out: Path, resume: bool, threads: int, preset: str | None = None, overwrite: bool = False) -> None:
    from dynamics.launch import die_with_launcher, in_worker

    if in_worker():
        die_with_launcher()
    import torch
    from tqdm import tqdm

    from dynamics.run import RunError
    from dynamics.tasks.separation.errors import DataError
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

    # Only what the user can fix is one line: the run directory, the data, the machine. A bug
    # inside training is a traceback with exit code 1.
    try:
        extra = {"command": sys.argv, **({"preset": preset} if preset else {})}
        record_task(opts, out, resume=resume, progress=progress, config=extra, overwrite=overwrite)
    except (RunError, DataError) as e:
        fail(str(e))
    except OSError as e:
        environment_failure(e, f"free space or fix permissions, then dyn record --resume {out}")
    finally:
        bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(out))
