"""The runs under a folder, read fast and without disturbing a run that is being written.

``load_runs(ROOT)`` finds every run directory under ROOT (recursively) and returns one
``RunInfo`` per run: its name (path relative to ROOT), status, last step, clipper, schedule,
quantities and last loss. It reads config.json, the Parquet footers and the last row group of
the steps table (or, for a run still writing, the last batch of its journal): never whole tables.

Status: "finished" (closed), "running" (config says running and a process holds the run's lock),
"interrupted" (config says running but nobody holds the lock: the process died or released the
run; it can resume), "damaged" (config.json or a table cannot be read; ``RunInfo.error`` says why).

The lock is looked up in /proc/locks (Linux), which takes no lock itself: a reader can never
make a writer or a resume wait or fail. Elsewhere a shared, non-blocking flock is tried and
released at once (it never blocks the writer; a resume in that microsecond would be refused).

``LiveRun`` serves the rows a running run appended since a step, reading only the journal bytes
that are new since its last call (the dashboard polls it).
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dynamics import journal
from dynamics.run import Run, RunError, load_run, path_argument, read_config
from dynamics.stats import clipper_label

STATUSES = ("running", "finished", "interrupted", "damaged")
_LOCK_ID = re.compile(r"^([0-9a-fA-F]+):([0-9a-fA-F]+):(\d+)$")


@dataclass(frozen=True)
class RunInfo:
    """One run of an index: what ``dyn ls`` prints, with the config it was read from.

    ``steps``: the last step whose rows are on disk (None when nothing was recorded);
    ``last_loss``: the training loss at that step (NaN if unknown); ``clipper``: the clipper's
    kind ("AutoClip", "NoClip", ...); ``p``: AutoClip's percentile (None for other clippers);
    ``label``: the clipper in words ("autoclip p=10"); ``error``: why a damaged run is damaged.
    ``load()`` reads the whole run (``dynamics.load_run``).
    """

    path: Path
    name: str
    status: str
    steps: int | None = None
    clipper: str | None = None
    p: float | None = None
    every: int | None = None
    quantities: tuple[str, ...] = ()
    last_loss: float = math.nan
    label: str = ""
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def load(self) -> Run:
        """The whole run, tables included."""
        return load_run(self.path)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready row (NaN as None): name, status, steps, clipper, p, every, quantities, last_loss, error."""
        loss = self.last_loss if math.isfinite(self.last_loss) else None
        return {
            "name": self.name,
            "status": self.status,
            "steps": self.steps,
            "clipper": self.clipper,
            "p": self.p,
            "every": self.every,
            "quantities": list(self.quantities),
            "last_loss": loss,
            "error": self.error,
        }


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Every folder under ``root`` (``root`` included) that holds a config.json, sorted by path.

    Symbolic links to folders are not followed and hidden folders are skipped; a run's own
    folders (its journal) are not searched for further runs.
    """
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        if "config.json" in files:
            found.append(Path(folder))
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def held_locks() -> set[tuple[int, int, int]] | None:
    """(device major, device minor, inode) of every file lock held on this machine, from /proc/locks;
    None where the kernel does not list them (not Linux)."""
    try:
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts:  # a process waiting for a lock, not holding one
            continue
        for part in parts:
            m = _LOCK_ID.match(part)
            if m:
                held.add((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))))
                break
    return held


def _flock_held(path: Path) -> bool | None:
    """Whether another open file holds a lock on ``path``: a shared non-blocking flock, released at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cannot tell
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing the file drops the shared lock, if it was taken
    return False


def lock_held(run_dir: str | os.PathLike, locks: set[tuple[int, int, int]] | None = None) -> bool | None:
    """Whether a process holds RUN_DIR/.lock (a recording is going on); None when it cannot be told.

    ``locks``: ``held_locks()``, read once for many runs. A lock listed under the file's inode
    but another device number (btrfs subvolumes report their own) is confirmed with a flock try.
    """
    path = Path(run_dir) / ".lock"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    if locks is None:
        locks = held_locks()
    if locks is None:
        return _flock_held(path)
    if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in locks:
        return True
    if any(ino == st.st_ino for _, _, ino in locks):
        return _flock_held(path)
    return False


def run_status(run_dir: str | os.PathLike, config: dict[str, Any], locks=None) -> str:
    """ "finished", "running" or "interrupted" from the config's status and the run's lock."""
    status = config.get("status")
    if status == "finished":
        return "finished"
    if status == "running":
        held = lock_held(run_dir, locks)
        return "interrupted" if held is False else "running"
    raise RunError(f"config.json: unknown status {status!r}")


def _last_row_parquet(path: Path) -> tuple[int | None, float]:
    """(last step, its loss) from the last row group of a Parquet table: its footer and two columns."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        if file.metadata.num_rows == 0:
            return None, math.nan
        names = file.schema_arrow.names
        columns = [c for c in ("step", "loss") if c in names]
        if "step" not in columns:
            raise RunError(f"{path}: no step column")
        group = file.read_row_group(file.metadata.num_row_groups - 1, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise RunError(f"{path}: corrupt table ({str(e).splitlines()[0]})") from None
    return _last_of(group)


def _last_of(table: pa.Table | pa.RecordBatch) -> tuple[int | None, float]:
    """(largest step, the loss of its last row) of a table or batch with a step column."""
    import pyarrow.compute as pc  # not numpy: pyarrow's to_numpy imports pandas (a third of a second)

    steps = table.column("step")
    if len(steps) == 0 or steps.null_count == len(steps):
        return None, math.nan
    largest = pc.max(steps)
    last = pc.indices_nonzero(pc.equal(steps, largest))[-1].as_py()  # nulls count as false
    loss = math.nan
    if "loss" in table.schema.names:
        value = table.column("loss")[last].as_py()
        loss = float(value) if value is not None else math.nan
    return largest.as_py(), loss


def _last_batch(path: Path) -> pa.RecordBatch | None:
    """The last non-empty complete record batch of a journal segment (a torn tail is ignored)."""
    try:
        batches = [b for b in journal.read_segment(path) if b.num_rows]
    except OSError:  # gone (the run closed) or not a file
        return None
    return batches[-1] if batches else None


def _last_row_journal(journal_dir: Path, table: str) -> tuple[int | None, float]:
    for segment in reversed(journal.segments(journal_dir, table)):
        batch = _last_batch(segment)
        if batch is not None:
            return _last_of(batch)
    return None, math.nan


def _last_row(run_dir: Path, finished: bool) -> tuple[int | None, float]:
    """The last recorded step and its loss: from the steps table (every step), else from metrics."""
    journal_dir = run_dir / "journal"
    for table in ("steps", "metrics"):
        parquet = run_dir / f"{table}.parquet"
        if (finished or not journal_dir.is_dir()) and parquet.exists():
            step, loss = _last_row_parquet(parquet)
        elif journal_dir.is_dir():
            step, loss = _last_row_journal(journal_dir, table)
        else:
            continue
        if step is not None:
            return step, loss
    return None, math.nan


def _short_quantity(text: Any) -> str:
    text = str(text)
    return text[:-2] if text.endswith("()") else text


def read_info(run_dir: str | os.PathLike, name: str | None = None, locks=None) -> RunInfo:
    """One run's index row; a run that cannot be read comes back with status "damaged" and the reason."""
    run_dir = Path(run_dir)
    name = name if name is not None else run_dir.name
    try:
        config = read_config(run_dir)
        status = run_status(run_dir, config, locks)
        steps, loss = _last_row(run_dir, finished=status == "finished")
        clipper = config.get("clipper") if isinstance(config.get("clipper"), dict) else {}
        p = clipper.get("p") if clipper.get("kind") == "AutoClip" else None
        every = config.get("every")
        quantities = config.get("quantities") or []
        return RunInfo(
            path=run_dir,
            name=name,
            status=status,
            steps=steps,
            clipper=clipper.get("kind"),
            p=float(p) if isinstance(p, (int, float)) else None,
            every=every if isinstance(every, int) else None,
            quantities=tuple(_short_quantity(q) for q in quantities) if isinstance(quantities, list) else (),
            last_loss=loss,
            label=clipper_label(config.get("clipper")),
            config=config,
        )
    except FileNotFoundError:  # the run closed while it was read: its journal made way for Parquet files
        return read_info(run_dir, name, locks) if (run_dir / "config.json").exists() else _damaged(run_dir, name)
    except (RunError, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return _damaged(run_dir, name, e)


def _damaged(run_dir: Path, name: str, error: Exception | None = None) -> RunInfo:
    reason = str(error) if error is not None else "the run directory changed while it was read"
    if isinstance(error, OSError):
        reason = f"{getattr(error, 'filename', None) or run_dir}: {error.strerror or error}"
    return RunInfo(path=run_dir, name=name, status="damaged", error=reason)


def _check_root(root: str | os.PathLike) -> Path:
    root = path_argument(root, "root")
    if not root.exists():
        raise RunError(f"{root}: no such folder")
    if not root.is_dir():
        raise RunError(f"{root}: not a folder")
    return root


def _name(root: Path, run_dir: Path) -> str:
    relative = run_dir.relative_to(root).as_posix()
    return relative if relative != "." else root.resolve().name


def load_runs(root: str | os.PathLike) -> list[RunInfo]:
    """Every run under ``root`` (recursively), sorted by name, as ``RunInfo`` rows (see the module).

    Raises RunError when ``root`` is not a folder. Damaged runs are listed, not skipped.

    Example::

        for run in dynamics.load_runs("runs"):
            print(run.name, run.status, run.steps, run.last_loss)
        finished = [r.load() for r in dynamics.load_runs("runs") if r.status == "finished"]
    """
    root = _check_root(root)
    locks = held_locks()
    return [read_info(d, _name(root, d), locks) for d in find_run_dirs(root)]


class RunIndex:
    """``load_runs`` for a dashboard that asks every few seconds: a run whose files did not change
    since the last call is not read again (its status is checked every time)."""

    def __init__(self, root: str | os.PathLike):
        self.root = _check_root(root)
        self._cache: dict[Path, tuple[tuple, RunInfo]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _signature(run_dir: Path) -> tuple:
        """What changes when a run's index row can change: its config and the files its last row comes from."""
        out = []
        for path in (run_dir / "config.json", run_dir / "steps.parquet", run_dir / "metrics.parquet"):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        journal_dir = run_dir / "journal"
        if journal_dir.is_dir():
            out.append(tuple(sorted(journal.sizes(journal_dir).items())))
        return tuple(out)

    def runs(self) -> list[RunInfo]:
        """The runs under the root now."""
        locks = held_locks()
        out = []
        with self._lock:
            found = find_run_dirs(self.root)
            for run_dir in found:
                signature = self._signature(run_dir)
                cached = self._cache.get(run_dir)
                if cached is not None and cached[0] == signature and cached[1].status != "damaged":
                    info = cached[1]
                    if info.status in ("running", "interrupted"):
                        info = _with_status(info, run_dir, locks)
                else:
                    info = read_info(run_dir, _name(self.root, run_dir), locks)
                self._cache[run_dir] = (signature, info)
                out.append(info)
            for gone in set(self._cache) - set(found):
                del self._cache[gone]
        return out

    def find(self, name: str) -> RunInfo | None:
        """The run called ``name`` (its path relative to the root), or None. Runs already seen are found
        without a new scan (their status may be a few seconds old); others after one."""
        with self._lock:
            seen = next((info for _, info in self._cache.values() if info.name == name), None)
        if seen is not None and (seen.path / "config.json").exists():
            return seen
        return next((r for r in self.runs() if r.name == name), None)


def _with_status(info: RunInfo, run_dir: Path, locks) -> RunInfo:
    from dataclasses import replace

    try:
        return replace(info, status=run_status(run_dir, info.config, locks))
    except RunError as e:
        return _damaged(run_dir, info.name, e)


# -- live rows -------------------------------------------------------------------------------------


class SegmentTail:
    """Reads the record batches appended to one Arrow IPC stream segment since the last call.

    It keeps the byte offset after the last complete message, so each call reads only new
    bytes; a message the writer has not finished is left for the next call.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.schema: pa.Schema | None = None

    def read(self) -> list[pa.RecordBatch]:
        """New complete batches; raises FileNotFoundError if the segment went, ValueError if it shrank."""
        size = os.stat(self.path).st_size
        if size < self.offset:
            raise ValueError(f"{self.path} shrank")
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        source = pa.BufferReader(data)
        batches = []
        consumed = 0
        while consumed < len(data):
            try:
                message = pa.ipc.read_message(source)
            except (pa.ArrowException, OSError, ValueError, EOFError):
                break  # an unfinished message: read it next time
            if message is None:
                break
            if self.schema is None:
                self.schema = pa.ipc.read_schema(message)
            else:
                batches.append(pa.ipc.read_record_batch(message, self.schema))
            consumed = source.tell()
        self.offset += consumed
        return batches


class TableTail:
    """Every row journalled for one table of a running run, read incrementally (see SegmentTail)."""

    def __init__(self, journal_dir: Path, name: str):
        self.journal_dir = journal_dir
        self.name = name
        self.segments: dict[str, SegmentTail] = {}
        self.batches: list[pa.RecordBatch] = []

    def update(self) -> bool:
        """Read what is new; False when the journal was cut back (a resume rewound it): start over."""
        paths = journal.segments(self.journal_dir, self.name)
        if set(self.segments) - {p.name for p in paths}:
            return False
        for path in paths:
            tail = self.segments.setdefault(path.name, SegmentTail(path))
            try:
                self.batches.extend(b for b in tail.read() if b.num_rows)
            except ValueError:
                return False
        return True

    def table(self) -> pa.Table | None:
        """Every row read so far, as one table (kept as one batch, so later calls do not pile up batches)."""
        if not self.batches:
            return None
        if len(self.batches) > 1:
            self.batches = journal.concat_batches(self.batches).combine_chunks().to_batches()
        return pa.Table.from_batches(self.batches)


LIVE_TABLES = ("metrics", "steps", "eval")


class LiveRun:
    """The rows of one run after a given step, for a page that polls: read from the journal while
    the run is open (only new bytes each time, no lock taken), from its Parquet files once closed."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._tails: dict[str, TableTail] | None = None
        self._closed: tuple[tuple, dict[str, pa.Table | None]] | None = None
        self._lock = threading.Lock()

    def _journal_tables(self) -> dict[str, pa.Table | None] | None:
        journal_dir = self.run_dir / "journal"
        if self._tails is None:
            self._tails = {name: TableTail(journal_dir, name) for name in LIVE_TABLES}
        for tail in self._tails.values():
            if not tail.update():
                self._tails = None
                return None
        return {name: tail.table() for name, tail in self._tails.items()}

    def _closed_tables(self) -> dict[str, pa.Table | None]:
        signature = RunIndex._signature(self.run_dir)
        if self._closed is None or self._closed[0] != signature:
            run = load_run(self.run_dir)
            tables = {name: pa.Table.from_pandas(getattr(run, name), preserve_index=False) for name in LIVE_TABLES}
            self._closed = (signature, tables)
        return self._closed[1]

    def tables(self) -> tuple[dict[str, pa.Table | None], bool]:
        """(table name -> all rows so far, whether the journal was cut back since the last call: a resume)."""
        with self._lock:
            rewound = False
            for _ in range(3):
                config = read_config(self.run_dir)
                if config.get("status") == "finished" or not (self.run_dir / "journal").is_dir():
                    return self._closed_tables(), rewound
                try:
                    tables = self._journal_tables()
                except FileNotFoundError:  # the run is closing (its journal goes) or a resume cut a segment
                    self._tails = None
                    continue
                if tables is not None:
                    return tables, rewound
                rewound = True
            return self._closed_tables(), rewound

    def rows_since(self, since: dict[str, int | None]) -> dict[str, Any]:
        """{"status", "steps", "rewound", "tables": {name: {column: [values...]}}} for the rows whose
        step is after ``since[name]`` (all rows where None); NaN and infinities as None (JSON)."""
        import pyarrow.compute as pc

        tables, rewound = self.tables()
        status = run_status(self.run_dir, read_config(self.run_dir))
        last = [t.column("step") for name, t in tables.items() if name != "eval" and t is not None and t.num_rows]
        steps = max((pc.max(c).as_py() for c in last), default=None)
        out: dict[str, dict[str, list]] = {}
        for name, table in tables.items():
            if table is None or table.num_rows == 0:
                continue
            after = since.get(name)
            if after is not None:
                table = table.filter(pc.greater(table.column("step"), after))
            if table.num_rows:
                out[name] = {c: _json_column(table.column(c)) for c in table.column_names}
        return {"status": status, "steps": steps, "rewound": rewound, "tables": out}


def _json_column(column: pa.ChunkedArray) -> list:
    values = column.to_pylist()
    if pa.types.is_floating(column.type):
        return [v if v is not None and math.isfinite(v) else None for v in values]
    return values
