"""`dyn diagnose`: events injected at known steps of synthetic runs are found at exactly those steps;
clean runs (trends, autocorrelated noise, a learning-rate decay, clipping) give no finding.

Runs are written with ``dynamics.run.save_run`` from frames built here, so every injected event and
its steps are known. The command is run in-process through its entry point (one line and exit code
2 on bad input), as tests/test_compare_groups.py does.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.signal import lfilter

from dynamics.diagnose import diagnose
from dynamics.errors import DynamicsError
from dynamics.run import load_run, save_run
from tests.test_compare_groups import in_process

N, EVERY = 3000, 10
CLIP_NORM = {"kind": "ClipNorm", "max_norm": 2.5, "nonfinite": "error"}
ADAM = {"kind": "Adam", "lr": 1e-3}
SGD = {"kind": "SGD", "lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0}


def ar1(rng, n: int, phi: float, scale: float) -> np.ndarray:
    """Gaussian AR(1) noise of standard deviation ``scale``."""
    return lfilter([1.0], [1.0, -phi], rng.standard_normal(n + 50))[50:] * scale * math.sqrt(1 - phi**2)


def clean_tables(seed: int) -> dict[str, pd.DataFrame]:
    """A falling loss and a rising gradient norm with autocorrelated multiplicative noise; a fixed clip
    threshold that clips some steps; metrics every EVERY steps with a step size under a 10x lr decay,
    smoothness and sharpness; per-layer gradient norms that are never zero."""
    rng = np.random.default_rng(seed)
    t = np.arange(N)
    loss = (0.2 + 2 * np.exp(-t / 400)) * np.exp(ar1(rng, N, 0.3, 0.08))
    g = (1 + 2 * t / N) * np.exp(ar1(rng, N, 0.5, 0.25))
    threshold = np.full(N, 2.5)
    steps = pd.DataFrame(
        {"step": t + 1, "loss": loss, "grad_norm": g, "threshold": threshold, "clipped": g > threshold}
    )
    metrics = steps.iloc[EVERY - 1 :: EVERY].reset_index(drop=True)
    k = len(metrics)
    lr = 1e-3 * np.where(np.arange(k) < k // 2, 1.0, 0.1)
    metrics = metrics.assign(
        step_size=lr * np.exp(0.2 * rng.normal(size=k)),
        smoothness=(0.5 + 2 * metrics.grad_norm) * np.exp(0.3 * rng.normal(size=k)),
        sharpness=20 + 5 * rng.normal(size=k),
        lr=lr,
    )
    names = ("encoder.weight", "encoder.bias", "head.weight")
    layers = pd.DataFrame(
        [(s, name, abs(rng.normal()) + 0.01) for s in metrics.step for name in names],
        columns=["step", "name", "grad_norm"],
    ).astype({"name": object})  # Arrow string, as the Recorder writes it
    return {"steps": steps, "metrics": metrics, "layers": layers}


def save(root, name: str, tables: dict, clipper=CLIP_NORM, optimizer=ADAM):
    return save_run(root / name, {"name": name, "clipper": clipper, "optimizer": optimizer}, **tables)


def rows_of(steps: pd.DataFrame, first: int, last: int) -> np.ndarray:
    return ((steps.step >= first) & (steps.step <= last)).to_numpy()


def spans(findings, kind: str) -> list[tuple[int, int]]:
    return [(f.first_step, f.last_step) for f in findings if f.kind == kind]


# ----------------------------------------------------------------------------------------------
# clean runs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clean_runs_have_no_findings(tmp_path, seed):
    tables = clean_tables(seed)
    assert 0.05 < tables["steps"].clipped.mean() < 0.5  # clipping happens, but is not saturated
    assert diagnose(load_run(save(tmp_path, "clean", tables))) == []


# ----------------------------------------------------------------------------------------------
# injected events, found at exactly their steps


@pytest.fixture(scope="module")
def eventful(tmp_path_factory):
    """A clean run with loss spikes, gradient-norm explosions, non-finite steps, a saturated stretch of
    clipping, a dead tensor and a tensor that is zero on some records only."""
    tables = clean_tables(5)
    steps = tables["steps"]
    for first, last, factor in ((500, 503, 3.0), (1800, 1800, 3.0)):
        steps.loc[rows_of(steps, first, last), "loss"] *= factor
    for first, last, factor in ((1200, 1201, 30.0), (2500, 2500, 30.0)):
        steps.loc[rows_of(steps, first, last), "grad_norm"] *= factor
    steps.loc[rows_of(steps, 2000, 2000), "loss"] = np.nan
    steps.loc[rows_of(steps, 2001, 2002), "grad_norm"] = np.inf
    low = rows_of(steps, 2601, 2900)  # a threshold far too low: every one of these 300 steps is clipped
    steps["threshold"] = np.where(low, 0.01, 1e3)  # and none of the others
    steps["clipped"] = steps.grad_norm > steps.threshold
    layers = tables["layers"]
    layers.loc[layers.name == "encoder.bias", "grad_norm"] = 0.0
    layers.loc[(layers.name == "head.weight") & (layers.step < 500), "grad_norm"] = 0.0
    run_dir = save(tmp_path_factory.mktemp("runs"), "eventful", tables)
    return run_dir, diagnose(load_run(run_dir))


def test_loss_spikes_at_their_steps(eventful):
    _, findings = eventful
    assert spans(findings, "loss_spike") == [(500, 503), (1800, 1800)]
    first = next(f for f in findings if f.kind == "loss_spike")
    assert first.value == pytest.approx(
        clean_tables(5)["steps"].loss[rows_of(clean_tables(5)["steps"], 500, 503)].max() * 3
    )
    assert "steps 500-503" in first.message and first.message.endswith(".")


def test_gradient_norm_explosions_at_their_steps(eventful):
    _, findings = eventful
    assert spans(findings, "grad_norm_explosion") == [(1200, 1201), (2500, 2500)]


def test_non_finite_steps_merged(eventful):
    _, findings = eventful
    (f,) = [f for f in findings if f.kind == "non_finite"]
    assert (f.first_step, f.last_step, f.value) == (2000, 2002, 3.0)


def test_clipping_saturation_over_the_low_threshold(eventful):
    _, findings = eventful
    (f,) = [f for f in findings if f.kind == "clip_saturation"]
    assert (f.first_step, f.last_step) == (2601, 2900) and f.value == 1.0
    assert "threshold is too low" in f.message


def test_dead_tensor_only(eventful):
    _, findings = eventful
    (f,) = [f for f in findings if f.kind == "dead_parameter"]
    assert "'encoder.bias'" in f.message and (f.first_step, f.last_step) == (EVERY, N)
    assert f.value == N // EVERY  # records


def test_nothing_else_is_found(eventful):
    _, findings = eventful
    assert len(findings) == 2 + 2 + 1 + 1 + 1
    assert [f.first_step for f in findings] == sorted(f.first_step for f in findings)


# ----------------------------------------------------------------------------------------------
# clipper, optimizer and step-size findings


def test_autoclip_that_never_clips(tmp_path):
    tables = clean_tables(6)
    steps = tables["steps"]
    steps["threshold"] = 1e3  # a percentile far above every norm: AutoClip never binds
    steps["clipped"] = False
    found = diagnose(load_run(save(tmp_path, "auto", tables, clipper={"kind": "AutoClip", "p": 10.0})))
    (f,) = found
    assert f.kind == "autoclip_never_clips" and (f.first_step, f.last_step) == (N // 10 + 1, N)
    g = steps.grad_norm.to_numpy()[N // 10 :]
    assert f.value == pytest.approx(g.max() / 1e3)
    # p = 100 is the paper's "no clipping": not a finding
    assert diagnose(load_run(save(tmp_path, "p100", tables, clipper={"kind": "AutoClip", "p": 100.0}))) == []


def test_autoclip_saturation_is_judged_against_its_percentile(tmp_path):
    tables = clean_tables(7)
    steps = tables["steps"]
    # p = 10 clips 90% by design: clipped on 9 of every 10 steps is no finding; every step from 1001 is
    clipped = np.arange(N) % 10 != 0
    clipped[1000:] = True
    steps["clipped"], steps["threshold"] = clipped, np.where(clipped, steps.grad_norm / 2, steps.grad_norm * 2)
    (f,) = diagnose(load_run(save(tmp_path, "auto", tables, clipper={"kind": "AutoClip", "p": 10.0})))
    # the oracle, window by window: windows of 150 steps (5% of 3000) clipped at a rate >= 0.95 (halfway
    # from p = 10's 90% to every step); their union, from its first clipped step to its last
    window, limit = 150, 0.95
    flagged = [i for i in range(N - window + 1) if clipped[i : i + window].mean() >= limit]
    covered = np.zeros(N, bool)
    for i in flagged:
        covered[i : i + window] = True
    rows = np.flatnonzero(covered & clipped)
    assert f.kind == "clip_saturation" and (f.first_step, f.last_step) == (rows[0] + 1, rows[-1] + 1)
    assert 1001 - window <= f.first_step <= 1001 and f.last_step == N and f.value == 1.0
    assert "p=10 implies" in f.message


def test_sharpness_above_the_edge_of_stability_for_sgd_only(tmp_path):
    tables = clean_tables(8)
    metrics = tables["metrics"]
    metrics["lr"] = 0.1  # edge 2 (1 + 0.9) / 0.1 = 38
    metrics.loc[metrics.step.between(1000, 1200), "sharpness"] = 45.0
    tables["steps"]["clipped"] = False
    (f,) = diagnose(load_run(save(tmp_path, "sgd", tables, optimizer=SGD)))
    assert f.kind == "edge_of_stability" and (f.first_step, f.last_step) == (1000, 1200)
    assert f.value == pytest.approx(45.0 / 38.0)
    assert diagnose(load_run(save(tmp_path, "adam", tables, optimizer={"kind": "Adam", "lr": 0.1}))) == []


def collapse_tables(seed: int, gradient_follows: bool, first_record: int) -> dict:
    tables = clean_tables(seed)
    metrics = tables["metrics"]
    after = np.arange(len(metrics)) >= first_record
    metrics.loc[after, "step_size"] *= 1e-6
    if gradient_follows:
        metrics.loc[after, "grad_norm"] *= 1e-6
    return tables


def test_step_size_collapse_while_the_gradient_stays(tmp_path):
    found = diagnose(load_run(save(tmp_path, "collapse", collapse_tables(9, False, 200))))
    (f,) = found
    assert f.kind == "step_size_collapse" and (f.first_step, f.last_step) == (201 * EVERY, N)
    assert f.value < 1e-5 and "learning rate did not" in f.message


@pytest.mark.parametrize("gradient_follows, first_record", [(True, 200), (False, 295)])
def test_no_collapse_at_a_minimum_or_in_a_schedule_tail(tmp_path, gradient_follows, first_record):
    """The gradient vanished with the step (a minimum); or only the last 5 of 300 records (under 5%)."""
    tables = collapse_tables(10, gradient_follows, first_record)
    assert diagnose(load_run(save(tmp_path, "run", tables))) == []


# ----------------------------------------------------------------------------------------------
# the command


def test_diagnose_command_text_and_json(eventful, tmp_path):
    run_dir, findings = eventful
    clean = save(tmp_path, "clean", clean_tables(0))
    r = in_process("diagnose", run_dir, clean)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    blocks = r.stdout.split("\n\n")
    assert blocks[0].startswith(f"{run_dir}: 7 findings") and blocks[1].strip() == f"{clean}: no findings"
    assert "loss_spike" in blocks[0] and "steps 500-503" in blocks[0]
    r = in_process("diagnose", run_dir, clean, "--json")
    data = json.loads(r.stdout)
    assert [d["kind"] for d in data] == [f.kind for f in findings]
    assert set(data[0]) == {"run", "kind", "first_step", "last_step", "value", "message"}
    assert all(d["run"] == str(run_dir) for d in data)


def test_info_counts_findings_by_kind(eventful):
    run_dir, _ = eventful
    r = in_process("info", run_dir)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "findings   7 (dyn diagnose for details)" in r.stdout
    assert "  loss_spike            2, first at step 500" in r.stdout
    assert "  non_finite            1, first at step 2000" in r.stdout


def test_bad_input_is_one_line(tmp_path):
    metrics_only = save_run(tmp_path / "no-steps", {"name": "x"}, metrics=clean_tables(0)["metrics"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    for target, message in ((metrics_only, "every-step table"), (foreign, "not a run directory")):
        r = in_process("diagnose", target)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and message in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(DynamicsError, match="every-step table"):
        diagnose(load_run(metrics_only))
    r = in_process("info", metrics_only)
    assert r.returncode == 0 and "findings   n/a" in r.stdout
