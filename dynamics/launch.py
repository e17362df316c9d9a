"""Multi-process training on one machine: launch workers (torch elastic), join their process group."""

from __future__ import annotations

import os
import sys


def in_worker() -> bool:
    """True inside a process that torchrun (or :func:`launch`) started as one of several."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def die_with_launcher() -> None:
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


def init_distributed(device: str = "cpu") -> None:
    """Join the process group torchrun set up (WORLD_SIZE > 1), on gloo for CPU, NCCL for CUDA."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")


def launch(nproc: int, args: list[str]) -> list[int]:
    """Run ``python ARGS...`` on ``nproc`` local processes (torchrun --standalone); their exit codes.

    All zeros when every worker succeeded; otherwise the failed workers' codes.
    """
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
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        return [f.exitcode for f in e.failures.values()] or [1]
    return [0] * nproc
