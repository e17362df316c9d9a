"""The run directory: config.json, journal/ while running, one Parquet file per table once closed.

RUN_DIR/config.json      what is needed to rerun, plus status ("running" or "finished")
RUN_DIR/journal/         Arrow IPC segments, while the run is open (crash-safe)
RUN_DIR/metrics.parquet  (and steps, layers, eval) once the run has closed
RUN_DIR/checkpoint.pt    the latest checkpoint, written atomically
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dynamics import journal

SCHEMA_VERSION = 1
TABLES = ("metrics", "steps", "layers", "eval")
METADATA_KEY = "dyn.config"  # every Parquet file of a run carries its config (JSON, with run_id) under this key

# Columns every metrics row has: the step's own numbers. Quantities add theirs between them and lr.
METRICS_BASE = [
    ("step", "int64"),
    ("epoch", "int64"),
    ("time_s", "float64"),
    ("loss", "float64"),
    ("grad_norm", "float64"),
    ("threshold", "float64"),
    ("clip_coef", "float64"),
    ("clipped", "bool"),
    ("clip_rate", "float64"),  # fraction of the optimizer steps since the previous record step that were clipped
]
METRICS_LAST = [("lr", "float64")]
STEPS = [
    ("step", "int64"),
    ("loss", "float64"),
    ("grad_norm", "float64"),
    ("threshold", "float64"),
    ("clipped", "bool"),
]
LAYERS_BASE = [("step", "int64"), ("name", "string")]
_TYPES = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


def schemas(metrics: list[tuple[str, str]], layers: list[tuple[str, str]]) -> dict[str, pa.Schema | None]:
    """The tables' Arrow schemas, given the (column, type name) pairs quantities add to metrics and layers."""

    def schema(columns):
        return pa.schema([(name, _TYPES[kind]) for name, kind in columns])

    return {
        "metrics": schema(METRICS_BASE + list(metrics) + METRICS_LAST),
        "steps": schema(STEPS),
        "layers": schema(LAYERS_BASE + list(layers)),
        "eval": None,  # the task's metrics, whatever they are, after a "step" column
    }


# The tables of a run recorded with the default quantities (and of runs that predate "tables" in config.json).
SCHEMAS = schemas(
    [("step_size", "float64"), ("smoothness", "float64")],
    [("grad_norm", "float64"), ("step_size", "float64"), ("param_norm", "float64")],
)


def _schemas_of(config: dict[str, Any]) -> dict[str, pa.Schema | None]:
    tables = config.get("tables")
    if not isinstance(tables, dict):
        return SCHEMAS
    try:
        return {
            **SCHEMAS,
            **{name: pa.schema([(c, pa.type_for_alias(t)) for c, t in cols]) for name, cols in tables.items()},
        }
    except (TypeError, ValueError, KeyError) as e:
        raise RunError(f"config.json: unreadable table schemas ({e})") from None


class RunError(ValueError):
    """A run directory that is missing, is no run, or holds a corrupt table."""


# What a process killed while creating a run leaves behind before config.json exists: a new run may go there.
LEFTOVERS = frozenset({".lock", "config.json.tmp"})
# Every name dyn writes into a run directory: a folder holding only these (and dyn's lock) is a dead run.
RUN_FILES = (
    LEFTOVERS
    | {"config.json", "journal", "checkpoint.pt", "checkpoint.pt.tmp"}
    | {f"{name}.parquet{tmp}" for name in TABLES for tmp in ("", ".tmp")}
)


def _entries(run_dir: Path) -> set[str]:
    return {child.name for child in run_dir.iterdir()} if run_dir.is_dir() else set()


def holds_dead_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run ``overwrite=True`` may replace: a config.json file, or a damaged run
    (config.json missing or a folder) whose every entry is a name dyn writes. Whether anyone still records
    into it is the lock's to say."""
    run_dir = Path(run_dir)
    entries = _entries(run_dir)
    if (run_dir / "config.json").is_file():
        return True
    return bool(entries & {"config.json", ".lock"}) and entries <= RUN_FILES


def check_new_run_dir(run_dir: str | os.PathLike, hint_overwrite: bool = True) -> None:
    """Raise RunError unless a new run can go into ``run_dir``: no run there, an empty folder or none
    yet (or only what a run killed while it was created left), under a folder this process may write.
    Checked before anything is created."""
    run_dir = Path(run_dir)
    try:
        if any(len(part.encode()) > 255 for part in run_dir.parts):
            raise RunError(f"{run_dir}: a folder name is too long")
        if (run_dir / "config.json").exists():
            replace = ", or replace it if nobody records it any more (overwrite=True)" if hint_overwrite else ""
            raise RunError(f"{run_dir} already holds a run: resume it, choose another directory{replace}")
        if run_dir.exists() and (not run_dir.is_dir() or not _entries(run_dir) <= LEFTOVERS):
            dead = hint_overwrite and holds_dead_run(run_dir)
            hint = " (a damaged dead run: overwrite=True replaces it)" if dead else ""
            raise RunError(f"{run_dir} exists and is not an empty directory: choose another directory{hint}")
        parent = run_dir.absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise RunError(f"{run_dir}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunError(f"{run_dir}: no permission to write in {parent}")
    except OSError as e:  # a name too long, a loop of links, an unreadable parent
        raise RunError(f"{run_dir}: {e.strerror or e}") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunDirectory:
    """A run directory as its writer holds it: created or attached under a lock, journals, compaction.

    Only the writing process (rank 0) makes one. The lock (RUN_DIR/.lock, an OS file lock)
    refuses a second writer and dies with the process however it dies, so a crashed run can be
    resumed or, with ``overwrite=True``, replaced; a live one never is.
    """

    def __init__(self, path: str | os.PathLike, schemas: dict[str, pa.Schema | None]):
        self.path = Path(path)
        self.schemas = schemas
        self.journals: dict[str, journal.Journal] = {}
        self._known: dict[str, int] = {}  # journal segment -> bytes known to hold rows (checkpointed or written)
        self._lock_file = None

    @property
    def journal_dir(self) -> Path:
        return self.path / "journal"

    def create(self, config: dict[str, Any], overwrite: bool = False) -> None:
        """Make a new run with ``config``; ``overwrite`` replaces a run nobody is recording any more."""
        if overwrite and holds_dead_run(self.path):
            self.lock()
            self._clear()
        else:
            check_new_run_dir(self.path)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunError(f"cannot create {self.path}: {e.strerror or e}") from None
            self.lock()
        write_json(self.path / "config.json", config)

    def _clear(self) -> None:
        """Remove a dead run's files (its lock stays: we hold it)."""
        import shutil

        for child in self.path.iterdir():
            if child.name == ".lock":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def attach(self) -> dict[str, Any]:
        """Lock an existing, unfinished run to continue it; returns its config."""
        config = read_config(self.path)
        if config.get("status") == "finished":
            raise RunError(f"{self.path} is a finished run: nothing to resume")
        self.lock()
        return config

    def lock(self) -> None:
        """Hold RUN_DIR/.lock while recording: a second writer is refused instead of interleaving rows."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        if self._lock_file is not None:
            return
        self._lock_file = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise RunError(f"{self.path} is being recorded by another process") from None

    def open_journals(self) -> None:
        """Open a writer per table (each writes a new segment on its first row)."""
        self.close_journals()
        self.journals = {name: journal.Journal(self.journal_dir, name, self.schemas[name]) for name in TABLES}

    def write(self, table: str, columns: dict[str, list]) -> None:
        self.journals[table].write(columns)

    def sizes(self) -> dict[str, int]:
        """Make the journal durable and return every segment's size, for a checkpoint to record.

        A segment that holds rows this run knows of and is missing or shorter on disk (deleted or
        truncated under the writer) is a RunError: a checkpoint must never count rows that are gone.
        """
        for j in self.journals.values():
            j.sync()
            self._known.update(j.written)
        problem = journal.check(self.journal_dir, self._known, verify=False)
        if problem is not None:
            raise RunError(f"{self.path}: {problem} while recording: rows are lost; resume from the last checkpoint")
        return journal.sizes(self.journal_dir)

    def rewind(self, sizes: dict[str, int]) -> None:
        """Cut the journal back to a checkpoint's ``sizes`` (checked first: a journal missing rows is refused)."""
        problem = journal.check(self.journal_dir, sizes)
        if problem is not None:
            raise RunError(f"{self.path}: {problem}; the checkpoint cannot be resumed without losing rows")
        self.close_journals()
        journal.rewind(self.journal_dir, sizes)
        self._known = dict(sizes)
        self.open_journals()

    def clear_journal(self) -> None:
        """Drop every journalled row (a run that never reached a checkpoint restarts from step 0)."""
        import shutil

        self.close_journals()
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        self._known = {}
        self.open_journals()

    def finish(self, config: dict[str, Any]) -> None:
        """Compact the journal into Parquet files (each carrying ``config``), mark the run finished, unlock."""
        import shutil

        self.sizes()  # refuses to finish a run whose journal lost rows
        self.close_journals()
        # the compaction reads every row anyway: check first that every byte this run wrote reads back
        problem = journal.check(self.journal_dir, self._known)
        if problem is not None:
            raise RunError(f"{self.path}: {problem} while recording: rows are lost; resume from the last checkpoint")
        metadata = {METADATA_KEY: json.dumps(config, sort_keys=True, default=str)}
        for name in TABLES:
            journal.compact(self.journal_dir, name, self.path / f"{name}.parquet", self.schemas[name], metadata)
        write_json(self.path / "config.json", config)
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        if self._lock_file is not None:
            (self.path / ".lock").unlink(missing_ok=True)
        self.release()

    def close_journals(self) -> None:
        for j in self.journals.values():
            self._known.update(j.written)
            j.close()

    def release(self) -> None:
        """Close the journals and let go of the lock (the run stays open for a later resume)."""
        self.close_journals()
        if self._lock_file is not None:
            self._lock_file.close()  # the OS lock goes with the file
            self._lock_file = None


# config.json fields the readers use, with the type each must have when present
_CONFIG_TYPES = {
    "status": str,
    "name": str,
    "run_id": str,
    "every": int,
    "steps": int,
    "world_size": int,
    "clipper": dict,
    "optimizer": dict,
    "model": dict,
    "tables": dict,
    "quantities": list,
}


def check_config_types(config: dict[str, Any], where: Any) -> None:
    """The config.json fields the readers use have their types, or a RunError naming the field."""
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise RunError(f"{where}: {key} should be {kind.__name__}, got {type(value).__name__} {value!r:.60}")


def read_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json, checked: a RunError names what is wrong with a missing, foreign or damaged one."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a directory")
    path = run_dir / "config.json"
    if not path.exists():
        raise RunError(f"{run_dir}: not a run directory (no config.json)")
    if not path.is_file():
        raise RunError(f"{path}: not a file, so not a run config")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: corrupt config ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise RunError(f"{path}: corrupt config (nested too deeply)") from None
    except OSError as e:
        raise RunError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(config, dict) or "schema_version" not in config:
        raise RunError(f"{path}: not a dyn run config (no schema_version)")
    version = config["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunError(f"{path}: not a dyn run config (schema_version {version!r})")
    if version > SCHEMA_VERSION:
        raise RunError(f"{path}: written by a newer dyn (schema_version {version}, this one reads {SCHEMA_VERSION})")
    check_config_types(config, path)
    return config


KEYS = {"layers": ("step", "name")}  # columns that say which row is which (other tables: step), never empty


def _cast(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """A numeric column as ``target``; a value the target cannot hold (2.5 or NaN as an integer, 0.3 as a
    bool) raises ArrowInvalid instead of being truncated."""
    import pyarrow.compute as pc

    if pa.types.is_boolean(target) and not pa.types.is_boolean(column.type):
        values = pc.drop_null(column)
        if len(values) and not pc.all(pc.is_in(values, pa.array([0, 1], column.type))).as_py():
            raise pa.ArrowInvalid(f"values other than 0 and 1 in a {target} column")
        return column.cast(target)
    # integers: safe casts refuse fractions, NaN and overflow; floats: any number is one (big ints round)
    return column.cast(target, safe=pa.types.is_integer(target))


def _check_columns(table: pa.Table, name: str, schema: pa.Schema | None, path: Path) -> pa.Table:
    """The columns a run's tables are known to have, as their types: numbers stay numbers, or a RunError."""
    for key in KEYS.get(name, ("step",)):
        if key in table.column_names and table.column(key).null_count:
            raise RunError(f"{path}: table {name}, column {key} has empty cells: every row needs its {key}")
    if schema is None:
        return table
    for field in schema:
        if field.name not in table.column_names:
            continue
        column = table.column(field.name)
        if column.type == field.type or (field.type == pa.string() and pa.types.is_large_string(column.type)):
            continue
        numeric = (
            pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)
        )
        if field.type == pa.string() or not (numeric or pa.types.is_null(column.type)):
            raise RunError(f"{path}: table {name}, column {field.name} holds {column.type}, not {field.type}")
        try:
            table = table.set_column(table.column_names.index(field.name), field.name, _cast(column, field.type))
        except pa.ArrowException as e:
            raise RunError(f"{path}: table {name}, column {field.name}: {str(e).splitlines()[0]}") from None
    return table


@dataclass
class Run:
    """A loaded run: its config and its tables as pandas DataFrames sorted by step."""

    path: Path
    config: dict[str, Any]
    metrics: Any
    steps: Any
    layers: Any
    eval: Any
    status: str = "finished"

    @property
    def name(self) -> str:
        return self.config.get("name") or self.path.name

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, metrics={len(self.metrics)} rows)"


def _read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise RunError(f"{path}: corrupt table ({str(e).splitlines()[0]})") from None


def _frame(table: pa.Table | None, name: str, schema: pa.Schema | None):
    import pandas as pd

    if table is None:
        table = schema.empty_table() if schema is not None else pa.table({"step": pa.array([], pa.int64())})
    frame = table.to_pandas()
    keys = list(KEYS.get(name, ("step",)))
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise RunError(f"table {name} has no {missing[0]} column")
    if name == "eval" and frame.step.duplicated().any():
        # several log_eval() calls at one step: one row holding each metric's latest value
        merged = frame.groupby("step", sort=False).last()
        frame = merged.reset_index()[frame.columns]
    # stable by step alone: a step's layer rows keep the model's parameter order
    frame = frame.drop_duplicates(subset=keys, keep="last").sort_values("step", kind="stable")
    return frame.reset_index(drop=True) if isinstance(frame, pd.DataFrame) else frame


def path_argument(run_dir: Any, what: str = "run_dir") -> Path:
    """``run_dir`` as a Path, or an ArgumentTypeError naming ``what`` when it is no path."""
    if isinstance(run_dir, (str, os.PathLike)) and str(run_dir):
        return Path(run_dir)
    from dynamics.errors import ArgumentTypeError

    raise ArgumentTypeError(f"{what} must be a path (str or pathlib.Path), got {type(run_dir).__name__} {run_dir!r}")


def load_run(run_dir: str | os.PathLike) -> Run:
    """Load a run that has closed, is still running, or was killed (even with SIGKILL)."""
    run_dir = path_argument(run_dir)
    for attempt in range(3):
        try:
            return _load_run(run_dir)
        except FileNotFoundError:
            # the run closed while we read it: its journal made way for the Parquet files; read again
            if attempt == 2:
                raise RunError(f"{run_dir}: the run changed while it was read; try again") from None


def _load_run(run_dir: Path) -> Run:
    config = read_config(run_dir)
    journal_dir = run_dir / "journal"
    table_schemas = _schemas_of(config)
    tables = {}
    for name in TABLES:
        parquet = run_dir / f"{name}.parquet"
        if config.get("status") == "finished" and parquet.exists():
            tables[name] = _read_parquet(parquet)
        elif journal_dir.exists():
            if not journal_dir.is_dir():
                raise RunError(f"{journal_dir}: not a folder, so the run's rows are gone")
            try:
                tables[name] = journal.read_table(journal_dir, name, table_schemas[name])
            except FileNotFoundError:
                raise  # the run closed while we read it: load_run reads again
            except (pa.ArrowException, OSError) as e:
                raise RunError(f"{journal_dir}: damaged journal of table {name} ({str(e).splitlines()[0]})") from None
        elif parquet.exists():
            tables[name] = _read_parquet(parquet)
        else:
            tables[name] = None
    for name in TABLES:
        if tables[name] is not None:
            tables[name] = _check_columns(tables[name], name, table_schemas[name], run_dir)
    return Run(
        path=run_dir,
        config=config,
        status=config.get("status", "unknown"),
        **{name: _frame(tables[name], name, table_schemas[name]) for name in TABLES},
    )


def save_run(run_dir: str | os.PathLike, config: dict[str, Any] | None, **tables: Any) -> Path:
    """Write a finished run from tables you already have (pandas DataFrames by table name).

    Useful to plot or compare dynamics logged elsewhere: ``metrics`` needs at least the
    columns the figures read (step, loss, grad_norm, threshold, step_size, smoothness).
    Every table needs a ``step`` column (``layers`` also ``name``); the columns dyn knows
    must hold numbers. ``run_dir`` must be new or an empty folder.

    Example::

        save_run("runs/imported", {"clipper": {"kind": "AutoClip", "p": 10.0}}, metrics=frame)
    """
    import pandas as pd
    import pyarrow.parquet as pq

    from dynamics.errors import ArgumentTypeError, DynamicsError

    run_dir = path_argument(run_dir)
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ArgumentTypeError(f"config must be a dict (what config.json will hold), got {type(config).__name__}")
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise DynamicsError(f"unknown tables {sorted(unknown)}; the tables are {TABLES}")
    config = {**config, "schema_version": SCHEMA_VERSION, "status": "finished"}
    check_config_types(config, "config")
    try:
        json.dumps(config, default=str, allow_nan=False)
    except ValueError as e:
        raise DynamicsError(f"config must be JSON without NaN or infinity: {e}") from None
    arrow = {}
    for name, frame in tables.items():
        if not isinstance(frame, pd.DataFrame):
            raise ArgumentTypeError(f"{name}= takes a pandas DataFrame, got {type(frame).__name__}")
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise DynamicsError(f"{name}= cannot be stored: {str(e).splitlines()[0]}") from None
        missing = [k for k in KEYS.get(name, ("step",)) if k not in table.column_names]
        if missing:
            raise DynamicsError(f"{name}= needs a {missing[0]!r} column (the rows' {missing[0]})")
        _check_columns(table, name, SCHEMAS[name], run_dir)
        arrow[name] = table
    if (run_dir / "config.json").exists():
        raise RunError(f"{run_dir} already holds a run")
    check_new_run_dir(run_dir, hint_overwrite=False)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {run_dir}: {e.strerror or e}") from None
    for name, table in arrow.items():
        tmp = run_dir / f"{name}.parquet.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, run_dir / f"{name}.parquet")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    write_json(run_dir / "config.json", config)
    return run_dir
