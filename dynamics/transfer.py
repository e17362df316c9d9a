"""One record step's device values on the host in one transfer, and typed for their columns exactly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dynamics.errors import DynamicsError
from dynamics.quantities import Quantity


class HostTransfer:
    """The device values of one record step, moved to the host in one transfer, bit for bit.

    Floating values travel as float64 and integer values as int64, both reinterpreted as int64
    bits, so an int64 column keeps 2**53 + 1 and a float keeps its every bit.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: list[Tensor] = []
        self.slots: list[tuple[int, int, bool]] = []  # (start, length, is_integer)
        self.size = 0

    def add(self, value: Tensor) -> int:
        t = value.detach().reshape(-1)
        integer = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        t = t.to(torch.int64) if integer else t.to(torch.float64).view(torch.int64)
        self.parts.append(t)
        self.slots.append((self.size, t.numel(), integer))
        self.size += t.numel()
        return len(self.slots) - 1

    def fetch(self) -> list[np.ndarray]:
        if not self.parts:
            return []
        bits = np.array(torch.cat([p.to(self.device) for p in self.parts]).tolist(), dtype=np.int64)  # the transfer
        return [bits[a : a + n] if integer else bits[a : a + n].view(np.float64) for a, n, integer in self.slots]


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def on_device(values: list) -> bool:
    """Pending ClipInfo values that are device tensors (an on-device clipper): they ride in the transfer."""
    return bool(values) and isinstance(values[0], Tensor)


def stacked(values: list, device: torch.device) -> Tensor:
    return torch.stack([torch.as_tensor(v, device=device).double().reshape(()) for v in values])


def host_int(value: int | Tensor) -> int:
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def column_values(values: np.ndarray, kind: str, q: Quantity, column: str) -> list:
    """Host values for a column of type ``kind``; a value the type cannot hold exactly is refused, not coerced."""
    where = f"{type(q).__name__} column {column!r} ({kind})"
    if kind in ("float64", "float32"):
        out = [float(v) for v in values.astype(np.float64)]
        if kind == "float32":
            largest = float(np.finfo(np.float32).max)
            wide = [v for v in out if math.isfinite(v) and abs(v) > largest]
            if wide:
                raise DynamicsError(f"{where}: got {wide[0]}, beyond float32's range: declare the column float64")
        return out
    if values.dtype == np.int64:
        if kind == "bool" and not np.isin(values, (0, 1)).all():
            raise DynamicsError(f"{where}: got {values.tolist()}, a bool column takes 0/1 or True/False")
        return [bool(v) for v in values] if kind == "bool" else [int(v) for v in values]
    out = []
    for v in values.tolist():
        if math.isnan(v):
            out.append(None)
        elif kind == "bool":
            if v not in (0.0, 1.0):
                raise DynamicsError(f"{where}: got {v}, a bool column takes 0/1 or True/False")
            out.append(v == 1.0)
        else:
            if not math.isfinite(v) or v != int(v) or abs(v) > 2**53:
                raise DynamicsError(f"{where}: got {v}, an int64 column takes whole numbers: return an integer tensor")
            out.append(int(v))
    return out


def column_tensor(q: Quantity, column: str, value: Any, k: int, device: torch.device) -> Tensor:
    """A quantity's result as a tensor of the length its table needs (k for layers, 1 for metrics), or a clear error."""
    where = f"{type(q).__name__} column {column!r}"
    try:
        # through numpy: a Python float stays float64 and an int int64 (torch would make a float float32)
        array = value if isinstance(value, Tensor) else np.asarray(value)
        if isinstance(array, np.ndarray) and array.dtype.kind not in "biuf":
            raise TypeError  # strings, None, objects, complex numbers
        t = torch.as_tensor(array, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise DynamicsError(f"{where}: compute returned {type(value).__name__}, not a number or tensor") from None
    if not (t.is_floating_point() or t.dtype == torch.bool or _is_integer_dtype(t.dtype)):
        raise DynamicsError(f"{where}: dtype {t.dtype} does not fit a column")
    want = k if q.table == "layers" else 1
    if t.numel() != want or t.dim() > 1:
        need = f"one value per parameter tensor, shape ({k},)" if q.table == "layers" else "one value, shape ()"
        raise DynamicsError(f"{where}: got shape {tuple(t.shape)}, the {q.table} table needs {need}")
    return t
