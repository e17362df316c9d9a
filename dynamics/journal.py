"""A crash-safe, append-only table: Arrow IPC stream segments, compacted to Parquet on close.

A Parquet file is unreadable until its footer is written, so rows go to an Arrow IPC
stream first: every complete record batch in a stream stays readable after the writer
is killed. Each process that appends opens a new segment (``NAME.00000.arrows``,
``NAME.00001.arrows``, ...), since a stream cannot be reopened for appending. A
checkpoint records every segment's size; resuming truncates the segments to those
sizes, so rows written after the checkpoint are dropped and written again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def segments(directory: Path, name: str) -> list[Path]:
    """The journal segments of table ``name``, oldest first."""
    return sorted(directory.glob(f"{name}.*.arrows"))


def read_segment(path: Path) -> list[pa.RecordBatch]:
    """Every complete record batch of one stream; a torn tail (a killed writer) is dropped."""
    batches = []
    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowException, OSError):  # not even the schema made it to disk
            return batches
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowException, OSError):
                break
    return batches


def read_table(directory: Path, name: str, schema: pa.Schema | None = None) -> pa.Table | None:
    """All rows journalled for ``name``; None if nothing was written."""
    batches = [b for path in segments(directory, name) for b in read_segment(path)]
    if not batches:
        return schema.empty_table() if schema is not None else None
    return concat_batches(batches)


def concat_batches(batches: list[pa.RecordBatch]) -> pa.Table:
    """Record batches as one table; batches with other columns (eval rows logged with other metrics) are
    unified, a missing column null."""
    if all(b.schema == batches[0].schema for b in batches):
        return pa.Table.from_batches(batches)
    return pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="default")


class Journal:
    """Appends record batches of one table to a new stream segment, flushed after every write.

    Example::

        j = Journal(run_dir / "journal", "metrics", schema)
        j.write({"step": [20], "loss": [0.5]})
        j.close()
    """

    def __init__(self, directory: Path, name: str, schema: pa.Schema | None = None):
        self.directory = Path(directory)
        self.name = name
        self.schema = schema
        self.fixed = schema is not None  # else each batch brings its own (eval: whatever metrics were logged)
        self.rows = 0
        self.written: dict[str, int] = {}  # segment name -> bytes this writer has written to it
        self._sink = None
        self._writer = None

    def _open(self, schema: pa.Schema) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = segments(self.directory, self.name)
        index = int(existing[-1].name.split(".")[-2]) + 1 if existing else 0
        self.path = self.directory / f"{self.name}.{index:05d}.arrows"
        self._sink = open(self.path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._sink.flush()
        self.written[self.path.name] = self._sink.tell()

    def write(self, columns: dict[str, list] | pa.RecordBatch) -> None:
        """Append one batch of rows and hand it to the OS (it survives the process being killed)."""
        if isinstance(columns, pa.RecordBatch):
            batch = columns
        elif self.fixed:
            # typed arrays column by column: about twice as fast as from_pydict on small batches
            arrays = [pa.array(columns[f.name], type=f.type) for f in self.schema]
            batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        else:
            batch = pa.RecordBatch.from_pydict(columns)
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self.schema = self.schema or batch.schema
            self._open(self.schema)
        if batch.schema != self.schema:  # a table without a fixed schema (eval) got new columns: a new segment
            self.close()
            self.schema = batch.schema
            self._open(self.schema)
        self._writer.write_batch(batch)
        self._sink.flush()
        self.rows += batch.num_rows
        self.written[self.path.name] = self._sink.tell()

    def sync(self) -> None:
        """Make every row written so far durable (fsync): a checkpoint that counts them comes after."""
        if self._sink is not None:
            self._sink.flush()
            os.fsync(self._sink.fileno())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


def sizes(directory: Path) -> dict[str, int]:
    """Byte size of every segment in a journal directory (recorded in checkpoints)."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    return {p.name: p.stat().st_size for p in sorted(directory.glob("*.arrows"))}


def check(directory: Path, recorded: dict[str, int], verify: bool = True) -> str | None:
    """What is wrong with a journal that should hold at least ``recorded`` (segment -> bytes), or None.

    Every recorded segment must exist, be at least as long as recorded, and its recorded
    prefix must read as whole record batches: a truncated, emptied, deleted or overwritten
    segment would otherwise lose rows silently on resume.
    """
    directory = Path(directory)
    for name, size in sorted(recorded.items()):
        path = directory / name
        if not path.exists():
            return f"journal segment {name} is missing"
        actual = path.stat().st_size
        if actual < size:
            return f"journal segment {name} holds {actual} bytes, the checkpoint counted {size}"
        if not verify:
            continue
        with open(path, "rb") as f:
            prefix = f.read(size)
        source = pa.BufferReader(prefix)
        try:
            reader = pa.ipc.open_stream(source)
            for _ in reader:
                pass
        except (pa.ArrowException, OSError, ValueError):
            return f"journal segment {name} is damaged"
        if source.tell() != size:  # the stream ended early: zeros where rows were (a file cut under its writer)
            return f"journal segment {name} is damaged (its rows end at byte {source.tell()} of {size})"
    return None


def rewind(directory: Path, recorded: dict[str, int]) -> None:
    """Cut a journal back to the sizes a checkpoint recorded: later rows and segments go."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.arrows")):
        size = recorded.get(path.name)
        if size is None:
            path.unlink()
        elif path.stat().st_size > size:
            os.truncate(path, size)


def compact(
    directory: Path, name: str, out: Path, schema: pa.Schema | None = None, metadata: dict[str, str] | None = None
) -> pa.Table:
    """Write every journalled row of ``name`` to one Parquet file, atomically (an empty table too).

    ``metadata`` goes into the file's key-value metadata (the run's config, so the file speaks for itself).
    """
    table = read_table(directory, name, schema)
    if table is None:
        table = pa.table({"step": pa.array([], pa.int64())})
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = out.with_name(out.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no partial file under either name; the journal still holds the rows
        raise
    return table
