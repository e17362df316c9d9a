"""``dyn export``: replay recorded runs into another tool's files (TensorBoard event files).

Each run becomes one sub-directory of DIR holding one event file:

    dyn/<column>                  the metrics table, at its record steps
    dyn_steps/<column>            the every-step table (loss, gradient norm, threshold, clipped)
    dyn_layers/<name>/<column>    the per-layer table, one tag per parameter tensor and column
    dyn_eval/<column>             held-out evaluation

NaN cells are left out (as the Recorder's loggers do); booleans are 0 and 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from cli.common import load_runs
from cli.errors import environment_failure, fail

EXPORT_SUFFIX = ".dyn-export"  # ends the name of every event file dyn writes: a re-export replaces only these
# table -> tag prefix
PREFIXES = {"metrics": "dyn", "steps": "dyn_steps", "eval": "dyn_eval"}
LAYERS_PREFIX = "dyn_layers"
VALUES_PER_EVENT = 32  # a step's scalars are split over events of at most this many values
CRC_GROUP = 4096  # records whose checksums are computed together (one numpy array per byte position)
WINDOW_BYTES = 32 << 20  # serialized events held at once before they are written


def _safe_name(name: str) -> str:
    """A run name usable as one folder name: path separators and odd characters become '_'."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._=+,@-]", "_", name).strip(".") or "run"
    return safe[:200]


def folder_names(runs) -> list[str]:
    """One sub-directory name per run: its name, or where two runs share one, the name and the run's id
    (or its parent folder), then a counter as the last resort."""
    names = [_safe_name(r.name) for r in runs]
    out = []
    for run, name in zip(runs, names):
        if names.count(name) > 1:
            run_id = str(run.config.get("run_id") or "")[:8]
            name = _safe_name(f"{name}-{run_id}" if run_id else f"{run.path.absolute().parent.name}-{name}")
        out.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            out[i] = f"{name}-{seen[name]}"
    return out


def _numeric(frame):
    """The columns of ``frame`` a scalar chart can show: numbers and booleans, step left out."""
    import pandas as pd

    return [
        c
        for c in frame.columns
        if c not in ("step", "name")
        and (pd.api.types.is_numeric_dtype(frame[c].dtype) or pd.api.types.is_bool_dtype(frame[c].dtype))
    ]


def scalars(run):
    """(steps, tag ids, values, tags) of every cell the run recorded that is not NaN, in step order;
    ``tags[id]`` names a value's tag (ids rather than one string per value: a transformer's layers table
    holds millions of values)."""
    import numpy as np
    import pandas as pd

    tags: list[str] = []
    steps, ids, values = [], [], []

    def add(step, codes, column_values):
        keep = ~np.isnan(column_values)
        steps.append(step[keep])
        ids.append(codes[keep])
        values.append(column_values[keep])

    for table, prefix in PREFIXES.items():
        frame = getattr(run, table)
        if frame is None or frame.empty:
            continue
        step = frame.step.to_numpy(dtype=np.int64)
        for column in _numeric(frame):
            tags.append(f"{prefix}/{column}")
            add(step, np.full(len(frame), len(tags) - 1), frame[column].to_numpy(dtype=float, na_value=np.nan))
    layers = run.layers
    if layers is not None and not layers.empty:
        step = layers.step.to_numpy(dtype=np.int64)
        codes, names = pd.factorize(layers.name.astype(str))
        for column in _numeric(layers):
            first = len(tags)
            tags.extend(f"{LAYERS_PREFIX}/{name}/{column}" for name in names)
            add(step, first + codes, layers[column].to_numpy(dtype=float, na_value=np.nan))
    if not steps:
        return np.array([], np.int64), np.array([], np.int64), np.array([], float), tags
    steps, ids, values = np.concatenate(steps), np.concatenate(ids), np.concatenate(values)
    order = np.argsort(steps, kind="stable")
    return steps[order], ids[order], values[order], tags


def _start_time(run) -> float:
    """About when the run started (seconds since the epoch): config.json's time less the run's duration
    once it has finished; a running run wrote config.json when it started."""
    try:
        written = (run.path / "config.json").stat().st_mtime
    except OSError:
        return time.time()
    duration = run.config.get("time_s") if run.status == "finished" else None
    return written - float(duration) if isinstance(duration, (int, float)) else written


def events(run):
    """The run's TensorBoard events (tensorboard's protos) in step order, at most VALUES_PER_EVENT values each:
    small records, whose checksums vectorize well."""
    import numpy as np
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    start = _start_time(run)
    yield Event(wall_time=start, file_version="brain.Event:2")
    steps, ids, values, tags = scalars(run)
    if not len(steps):
        return
    m = run.metrics
    if "time_s" in m.columns and m.time_s.notna().any():
        ok = m.time_s.notna().to_numpy()
        clock = np.interp(steps, m.step.to_numpy()[ok], m.time_s.to_numpy(dtype=float)[ok])
    else:
        clock = np.zeros(len(steps))
    bounds = np.flatnonzero(np.diff(steps)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(steps)]])
    for a, b in zip(starts.tolist(), ends.tolist()):
        wall, step = start + float(clock[a]), int(steps[a])
        names, numbers = [tags[i] for i in ids[a:b].tolist()], values[a:b].tolist()
        for c in range(0, b - a, VALUES_PER_EVENT):
            chunk = zip(names[c : c + VALUES_PER_EVENT], numbers[c : c + VALUES_PER_EVENT])
            summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in chunk])
            yield Event(wall_time=wall, step=step, summary=summary)


def _export_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(event files an earlier export wrote, anything else) in ``folder``."""
    if not folder.exists():
        return [], []
    entries = list(folder.iterdir())
    ours = [p for p in entries if p.is_file() and p.name.endswith(EXPORT_SUFFIX) and "tfevents" in p.name]
    return ours, [p for p in entries if p not in ours]


def _crc_table():
    import numpy as np

    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # CRC-32C (Castagnoli), reflected: polynomial 0x82F63B78
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


def _flip4(chunk: bytes) -> bytes:
    return (int.from_bytes(chunk[:4], "little") ^ 0xFFFFFFFF).to_bytes(4, "little") + chunk[4:]


def masked_crc32c_many(chunks: list[bytes]):
    """TFRecord's masked CRC-32C of each byte string (as ``tensorboard``'s ``masked_crc32c``), as a uint32 array.

    tensorboard computes it a byte at a time in Python (about 4 MB/s); here records of similar
    length go through one table lookup per byte position for all of them at once: the register
    starts at 0, which leading zero padding leaves at 0, and the initial 0xFFFFFFFF is applied as
    an XOR of the first four bytes (equivalent for a reflected CRC).
    """
    import numpy as np
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    table = _crc_table()
    lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
    crcs = np.zeros(len(chunks), dtype=np.uint32)
    short = np.flatnonzero(lengths < 4)
    for i in short:  # too short for the XOR form (no record here is, but stay correct)
        crcs[i] = masked_crc32c(chunks[i])
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] >= 4]
    sorted_lengths = lengths[order]
    start = 0
    while start < len(order):
        # a group: up to CRC_GROUP records, none more than about twice as long as the shortest (little padding)
        end = int(np.searchsorted(sorted_lengths, 2 * sorted_lengths[start] + 64, side="right"))
        group, start = order[start : min(end, start + CRC_GROUP)], min(end, start + CRC_GROUP)
        width = int(lengths[group[-1]])
        # records right-aligned (leading zeros), each one's first four bytes XORed with 0xFF; byte position x record
        padded = b"".join(bytes(width - len(c)) + _flip4(c) for c in map(chunks.__getitem__, group.tolist()))
        columns = np.ascontiguousarray(np.frombuffer(padded, dtype=np.uint8).reshape(len(group), width).T)
        register = np.zeros(len(group), dtype=np.uint32)
        for byte in columns:
            register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
        crc = register ^ np.uint32(0xFFFFFFFF)
        crcs[group] = ((crc >> 15) | (crc << 17)) + np.uint32(0xA282EAD8)  # the TFRecord mask (wraps mod 2**32)
    return crcs


def _write_records(f, records: list[bytes]) -> None:
    """TFRecord framing: length (uint64), its masked CRC, the data, the data's masked CRC (little-endian)."""
    import struct

    headers = [struct.pack("<Q", len(r)) for r in records]
    header_crcs, data_crcs = masked_crc32c_many(headers), masked_crc32c_many(records)
    f.write(
        b"".join(
            h + struct.pack("<I", hc) + r + struct.pack("<I", dc)
            for h, hc, r, dc in zip(headers, header_crcs.tolist(), records, data_crcs.tolist())
        )
    )


def write_events(run, folder: Path) -> Path:
    """Write the run's event file into ``folder``: under a temporary name, renamed once complete; then
    the event files of an earlier export of the run are removed."""
    import secrets
    import socket

    earlier, _ = _export_files(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}{EXPORT_SUFFIX}"
    tmp = folder / f".dyn-{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "wb") as f:
            window, size = [], 0
            for event in events(run):
                window.append(event.SerializeToString())
                size += len(window[-1])
                if size >= WINDOW_BYTES:
                    _write_records(f, window)
                    window, size = [], 0
            _write_records(f, window)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created:
            folder.rmdir()
        raise
    for path in earlier:
        if path.name != name:
            path.unlink(missing_ok=True)
    return folder / name


def _check_dir(out: Path) -> None:
    """DIR is a folder this process can write in (created if missing): bad input exit 2, a fault exit 1."""
    import secrets

    if out.exists() and not out.is_dir():
        fail(f"--tensorboard {out} is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dyn-probe-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.unlink(probe)
    except NotADirectoryError:
        fail(f"--tensorboard {out}: a part of the path is a file, not a folder")
    except OSError as e:
        environment_failure(e, "choose another folder or fix its permissions", path=out)


@click.command("export")
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--tensorboard",
    "tensorboard_dir",
    type=click.Path(),  # a str: an empty one is refused (as a Path it would be ".")
    default=None,
    metavar="DIR",
    help="Write TensorBoard event files: DIR/<run name>/, one per run.",
)
def export(run_dirs, tensorboard_dir):
    """Replay recorded runs (finished or still running) into TensorBoard event files.

    Tags: dyn/<column> (metrics table, at record steps), dyn_steps/<column> (every step),
    dyn_layers/<name>/<column> (per parameter tensor), dyn_eval/<column> (held-out evaluation).
    Exporting a run again replaces its earlier export. View with: tensorboard --logdir DIR
    """
    if tensorboard_dir is None:
        fail("choose what to export to: --tensorboard DIR")
    if not tensorboard_dir:
        fail("--tensorboard '': name a folder, e.g. --tensorboard tb")
    tensorboard_dir = Path(tensorboard_dir)
    if not run_dirs:
        fail("give at least one RUN_DIR, e.g. dyn export runs/autoclip-p10 --tensorboard tb")
    unique = list({Path(d).absolute(): d for d in run_dirs}.values())  # a run named twice is exported once
    runs = load_runs(unique)
    names = folder_names(runs)
    for name in names:
        _, others = _export_files(tensorboard_dir / name)
        if others:
            fail(
                f"--tensorboard {tensorboard_dir / name} holds files dyn did not write ({others[0].name}); "
                "choose another DIR"
            )
    _check_dir(tensorboard_dir)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        fail("--tensorboard needs the tensorboard extra: pip install 'dyn[tensorboard]'")
    from tqdm import tqdm

    written = []
    with tqdm(total=len(runs), unit="run", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        for run, name in zip(runs, names):
            try:
                write_events(run, tensorboard_dir / name)
            except OSError as e:
                environment_failure(e, "free space or fix permissions and retry", path=tensorboard_dir / name)
            written.append(tensorboard_dir / name)
            bar.update(1)
    for folder in written:
        click.echo(str(folder))
