"""Multi-process training on one machine or several: launch workers (torch elastic), join their process group."""

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


class RendezvousFailed(RuntimeError):
    """The nodes of a multi-node launch did not meet: one line saying why and what to check."""


def quiet_cpp_logs() -> None:
    """Keep c10d's C++ warnings (a peer not up yet, an address family missing) out of a launcher's stderr.

    The level is read once, when torch is imported, so call this first; it applies to this process
    only (workers get the caller's environment). Does nothing if torch is loaded or the user set it.
    """
    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401  (reads the level)
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def launch(
    nproc: int, args: list[str], nnodes: int = 1, endpoint: str | None = None, timeout: float = 600.0
) -> list[int]:
    """Run ``python ARGS...`` on ``nproc`` processes here; their exit codes (all zeros when every worker succeeded).

    ``nnodes > 1``: this machine is one of ``nnodes`` running the same call, meeting at ``endpoint``
    (HOST:PORT, torch elastic's c10d rendezvous, hosted by the node that can bind it) within
    ``timeout`` seconds; RendezvousFailed if they do not.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if nnodes > 1:
        seconds = max(1, int(round(timeout)))
        config = LaunchConfig(
            min_nodes=nnodes,
            max_nodes=nnodes,
            nproc_per_node=nproc,
            run_id="dyn",  # the same on every node
            rdzv_backend="c10d",
            rdzv_endpoint=endpoint,
            # read_timeout also bounds the wait for the endpoint to answer at all
            rdzv_configs={"join_timeout": seconds, "read_timeout": seconds},
            max_restarts=0,
        )
    else:
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
    except RendezvousTimeoutError:
        raise RendezvousFailed(
            f"the {nnodes} nodes did not all join at {endpoint} within {seconds} s: start the same command "
            "on every node (or wait longer with --rdzv-timeout)"
        ) from None
    except RendezvousConnectionError:
        raise RendezvousFailed(
            f"could not reach the rendezvous at {endpoint} within {seconds} s: check the host name and port "
            "(the first node's, reachable from every node)"
        ) from None
    except RendezvousError as e:
        raise RendezvousFailed(f"the rendezvous at {endpoint} failed: {type(e).__name__} {e}") from None
    return [0] * nproc
