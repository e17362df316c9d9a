"""The callbacks' dyn/ metrics in the frameworks' own logs, their one signature, and the checks of their arguments."""

import inspect
import math
import warnings

import numpy as np
import pandas as pd
import pytest

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from dynamics import load_run  # noqa: E402
from dynamics.errors import ArgumentTypeError, DynamicsError  # noqa: E402
from dynamics.integrations import huggingface, lightning  # noqa: E402
from dynamics.quantities import Sharpness, UpdateRatio  # noqa: E402
from tests.helpers import assert_equal_params  # noqa: E402
from tests.test_huggingface import _train  # noqa: E402
from tests.test_lightning import _fit, _params  # noqa: E402


def _logged_rows(rows: list[dict]) -> dict[int, dict[str, float]]:
    """step -> the dyn/ values logged at that step (each record step logs once)."""
    out = {}
    for row in rows:
        values = {k: v for k, v in row.items() if k.startswith("dyn/") and not (isinstance(v, float) and math.isnan(v))}
        if values:
            assert int(row["step"]) not in out, f"step {row['step']} logged twice"
            out[int(row["step"])] = values
    return out


def _assert_logged_equal_table(logged: dict[int, dict[str, float]], metrics: pd.DataFrame) -> None:
    """Every metrics row was logged at its step, every non-NaN column as dyn/<column>, to 1e-6 relative."""
    assert sorted(logged) == list(metrics.step)
    for _, row in metrics.iterrows():
        expected = {
            f"dyn/{c}": float(v) for c, v in row.items() if c != "step" and v is not None and not pd.isna(v)
        }  # NaN columns (a quantity measured less often) are left out
        got = logged[int(row.step)]
        assert set(got) == set(expected), int(row.step)
        for key, value in expected.items():
            assert float(got[key]) == pytest.approx(value, rel=1e-6, abs=0.0), (int(row.step), key)


def test_lightning_logs_dyn_metrics_to_every_logger_and_training_is_unchanged(tmp_path):
    plain, _ = _fit(tmp_path, [])
    csv = pl.loggers.CSVLogger(tmp_path / "logs", name="csv", version=0)
    quantities = [UpdateRatio(), Sharpness(every=4, iters=5)]
    dyn = lightning.DynamicsCallback(tmp_path / "run", every=2, quantities=quantities)
    recorded, _ = _fit(tmp_path, [dyn], logger=[csv])
    assert_equal_params(_params(plain), _params(recorded))
    metrics = load_run(tmp_path / "run").metrics
    assert list(metrics.step) == [2, 4, 6, 8]
    assert metrics.sharpness.isna().tolist() == [True, False, True, False]
    assert "smoothness" not in metrics and "step_size" not in metrics  # quantities= is the whole list
    logged = _logged_rows(pd.read_csv(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv").to_dict("records"))
    _assert_logged_equal_table(logged, metrics)
    assert "dyn/sharpness" in logged[4] and "dyn/sharpness" not in logged[2]


class OnLog(transformers.TrainerCallback):
    """What a report_to integration receives: every on_log call's logs."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def test_recording_trainer_logs_dyn_metrics_into_log_history_and_every_integration(tmp_path):
    spy = OnLog()
    trainer = _train(
        tmp_path, [huggingface.DynamicsCallback(tmp_path / "run", every=2), spy], huggingface.RecordingTrainer
    )
    metrics = load_run(tmp_path / "run").metrics
    assert np.isfinite(metrics.loss).all() and np.isfinite(metrics.smoothness).all()
    _assert_logged_equal_table(_logged_rows(trainer.state.log_history), metrics)
    _assert_logged_equal_table(_logged_rows(spy.logs), metrics)


def test_plain_trainer_warns_once_naming_recording_trainer_and_fills_log_history(tmp_path):
    dyn = huggingface.DynamicsCallback(tmp_path / "run", every=2, overwrite=True)
    spy = OnLog()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path, [dyn, spy])
        trainer = _train(tmp_path, [dyn, spy])  # the same callback again: no second warning
    named = [w for w in caught if "RecordingTrainer" in str(w.message)]
    assert len(named) == 1 and "log_history" in str(named[0].message)
    metrics = load_run(tmp_path / "run").metrics
    assert metrics.loss.isna().all() and metrics.smoothness.isna().all()
    _assert_logged_equal_table(_logged_rows(trainer.state.log_history), metrics)
    assert _logged_rows(spy.logs) == {}  # as the warning says: no integration sees them


SIGNATURE = [
    ("run_dir", inspect.Parameter.empty),
    ("every", 20),
    ("probes", 1),
    ("layers", True),
    ("quantities", None),
    ("log", True),
    ("finish", True),
    ("overwrite", False),
]


@pytest.mark.parametrize("callback", [lightning.DynamicsCallback, huggingface.DynamicsCallback])
def test_both_callbacks_take_the_same_arguments_with_the_same_defaults(callback):
    params = list(inspect.signature(callback).parameters.values())
    assert [(p.name, p.default) for p in params] == SIGNATURE


@pytest.mark.parametrize("callback", [lightning.DynamicsCallback, huggingface.DynamicsCallback])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(every=0), DynamicsError, "every must be a positive integer"),
        (dict(every=2.0), ArgumentTypeError, "every must be a positive integer"),
        (dict(probes=-1), DynamicsError, "probes"),
        (dict(layers="yes"), ArgumentTypeError, "layers must be True or False"),
        (dict(log=1), ArgumentTypeError, "log must be True or False"),
        (dict(finish=None), ArgumentTypeError, "finish must be True or False"),
        (dict(overwrite="no"), ArgumentTypeError, "overwrite must be True or False"),
        (dict(quantities=UpdateRatio()), ArgumentTypeError, "quantities must be a list"),
        (dict(quantities=["step_size"]), ArgumentTypeError, "Quantity objects, got str"),
        (dict(quantities=[UpdateRatio()], layers=False), DynamicsError, "layers=False, yet quantities="),
        (dict(run_dir=3), ArgumentTypeError, "run_dir must be a path"),
        (dict(run_dir=""), ArgumentTypeError, "run_dir must be a path"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(callback, kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        callback(**{"run_dir": tmp_path / "run", **kwargs})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("callback", [lightning.AutoClipCallback, huggingface.AutoClipCallback])
@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(p=101), DynamicsError), (dict(p="10"), ArgumentTypeError), (dict(window=0), DynamicsError),
     (dict(per_group=1), ArgumentTypeError)],
)  # fmt: skip
def test_bad_autoclip_arguments_are_refused(callback, kwargs, error):
    with pytest.raises(error):
        callback(**kwargs)
