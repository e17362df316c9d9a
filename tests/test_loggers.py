"""Loggers into the user's own dashboard, each read back with the tool's own reader.

TensorBoard: the event files through tensorboard's EventAccumulator. Weights & Biases: an offline
run (WANDB_MODE=offline), its .wandb file's records decoded with wandb's own protobuf schema.
MLflow: a local file store read back with MlflowClient().get_metric_history. End to end: a
Recorder with a TensorBoard logger, whose values equal the run's metrics table at the same steps.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib

import numpy as np
import pytest
import torch

from dynamics import loggers
from dynamics.errors import DynamicsError

ROWS = {
    20: {"dyn/loss": 0.6931471805599453, "dyn/grad_norm": 12.5, "dyn/threshold": math.inf, "dyn/clip_rate": 0.0},
    40: {"dyn/loss": 0.5, "dyn/grad_norm": 3.0e-4, "dyn/threshold": 2.25, "dyn/clip_rate": 0.35},
    60: {"dyn/loss": 0.125, "dyn/grad_norm": 7.0, "dyn/smoothness": 123.456},  # a quantity on some steps only
}


def expected_series() -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in ROWS.items():
        for tag, value in metrics.items():
            series.setdefault(tag, []).append((step, value))
    return series


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_series_equal(got: dict, expected: dict, rel: float) -> None:
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got[tag], points):
            assert a == b or a == pytest.approx(b, rel=rel), (tag, a, b)


# ----------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_events_are_on_disk_without_close(tmp_path):
    logger = loggers.tensorboard(tmp_path / "tb")
    for step, metrics in ROWS.items():
        logger(metrics, step)
    # read before close: what a crash would leave behind (float32 in TensorBoard: 6e-8 relative)
    assert_series_equal(tensorboard_scalars(tmp_path / "tb"), expected_series(), rel=1e-6)
    logger.close()


def test_tensorboard_into_a_writer_of_your_own(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    writer.add_scalar("mine/accuracy", 0.75, 20)
    with loggers.tensorboard(writer) as logger:
        logger(ROWS[20], 20)
    writer.add_scalar("mine/accuracy", 0.8, 40)  # closing the logger left the user's writer open
    writer.close()
    got = tensorboard_scalars(tmp_path / "tb")
    assert got["mine/accuracy"] == [(20, 0.75), (40, pytest.approx(0.8))]
    assert got["dyn/grad_norm"] == [(20, 12.5)]


# ----------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_records(path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, 32 KiB blocks of
    chunks with a CRC-32 of type and data), each record decoded with wandb's own schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, "corrupt chunk"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(path) -> dict[str, list[tuple[int, float]]]:
    import json

    series: dict[str, list[tuple[int, float]]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = "/".join(item.nested_key) or item.key
            if not key.startswith("_"):
                series.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return series


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(var, value)
    import wandb

    yield wandb
    wandb.teardown()


def test_wandb_offline_run_holds_the_values(wandb_offline, tmp_path):
    run = wandb_offline.init(project="dyn-test")
    try:
        logger = loggers.wandb()  # the run wandb.init() started
        for step, metrics in ROWS.items():
            logger(metrics, step)
    finally:
        run.finish()
        wandb_offline.teardown()  # waits for W&B's service to finish writing the run's file
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    got = wandb_history(path)
    assert got == expected_series()  # JSON keeps every digit (and Infinity): equal, not close


def test_wandb_needs_a_run(wandb_offline):
    with pytest.raises(DynamicsError, match=r"call wandb.init\(\) first"):
        loggers.wandb()
    with pytest.raises(DynamicsError, match="must be a W&B run"):
        loggers.wandb(run="my-run")


# ----------------------------------------------------------------------------------------------
# MLflow


def test_mlflow_local_file_store_holds_the_values(tmp_path, monkeypatch):
    # MLflow 3 keeps its file store only on request; a database store needs sqlalchemy (not in mlflow-skinny)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as run:
        logger = loggers.mlflow()
        for step, metrics in ROWS.items():
            logger(metrics, step)
    client = MlflowClient()
    got = {
        tag: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)]
        for tag in expected_series()
    }
    assert got == expected_series()


# ----------------------------------------------------------------------------------------------
# missing extras


@pytest.mark.parametrize(
    "module, make, extra",
    [
        ("torch.utils.tensorboard", lambda p: loggers.tensorboard(p), "tensorboard"),
        ("wandb", lambda p: loggers.wandb(), "wandb"),
        ("mlflow", lambda p: loggers.mlflow(), "mlflow"),
    ],
)
def test_a_missing_extra_names_what_to_install(tmp_path, monkeypatch, module, make, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(DynamicsError, match=rf"pip install 'dyn\[{extra}\]'"):
        make(tmp_path / "tb")


# ----------------------------------------------------------------------------------------------
# end to end: the Recorder's metrics into TensorBoard


def test_recorder_values_reach_tensorboard(tmp_path):
    from dynamics import Recorder, load_run
    from tests.helpers import batches, make_model

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    logger = loggers.tensorboard(tmp_path / "tb")
    rec = Recorder(model, optimizer, tmp_path / "run", every=3, loggers=[logger])
    for x, y in batches(16):
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    rec.close()
    logger.close()
    metrics = load_run(tmp_path / "run").metrics
    got = tensorboard_scalars(tmp_path / "tb")
    expected = {}
    for column in metrics.columns.drop("step"):
        values = metrics[column].to_numpy(dtype=float)
        keep = ~np.isnan(values)
        if keep.any():
            expected[f"dyn/{column}"] = list(zip(metrics.step[keep].tolist(), values[keep].tolist()))
    assert len(metrics) == 5 and {"dyn/loss", "dyn/grad_norm", "dyn/clip_rate", "dyn/step_size"} <= set(expected)
    assert_series_equal(got, expected, rel=1e-6)
