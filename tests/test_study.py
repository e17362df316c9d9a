"""`dyn study`: the document is computed from the runs (and regenerates identically), verdicts follow the intervals."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dynamics.run import save_run
from figures.study import README_BEGIN, README_END, verdict
from tests.helpers import dyn
from tests.test_compare_groups import EVERY, ROWS, config, make_tables

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep folder of 3 seeds x {p=10, p=100}; p=10 has a higher SI-SDRi and lower step-size CV."""
    root = tmp_path_factory.mktemp("study") / "sweep"
    root.mkdir()
    (root / "sweep.json").write_text("{}")
    finals = {}
    for p, rho in ((10.0, 0.9), (100.0, 0.2)):
        for seed in SEEDS:
            name = f"mi-p{p:g}-s{seed}"
            si_sdri = 3.0 + 0.1 * seed + (1.5 if p == 10 else 0.0)
            ev = pd.DataFrame({"step": np.array([ROWS * EVERY - EVERY], np.int64), "si_sdri": [si_sdri]})
            tables = make_tables(p, rho, seed, ev)
            if p == 100:  # an unsteady step size without clipping
                tables["metrics"]["step_size"] *= 1 + 3 * np.random.default_rng(seed).random(ROWS)
            cfg = config(name, p, seed)
            cfg["task"].update(batch_size=8, n_samples=4096, data="speech")
            save_run(root / name, cfg, **tables)
            finals[name] = tables
    return root, finals


def _cv(step_size):
    return np.std(step_size) / np.mean(step_size)


def test_study_numbers_match_an_independent_computation(sweep, tmp_path):
    root, tables = sweep
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold text\n{README_END}\n\nmore\n")
    out = tmp_path / "study.md"
    result = dyn("study", root, "--out", out, "--readme", readme)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    a = [tables[f"mi-p10-s{s}"] for s in SEEDS]
    b = [tables[f"mi-p100-s{s}"] for s in SEEDS]
    cv_a = [_cv(t["metrics"].step_size) for t in a]
    cv_b = [_cv(t["metrics"].step_size) for t in b]
    welch = stats.ttest_ind(cv_a, cv_b, equal_var=False).confidence_interval(0.95)
    diff = np.mean(cv_a) - np.mean(cv_b)
    row = next(line for line in text.splitlines() if line.startswith("| AutoClip makes the step size steadier"))
    assert f"{diff:.3g} [{welch.low:.3g}, {welch.high:.3g}]" in row
    assert row.endswith(f"**{verdict(welch.low, welch.high, 'lower')}** |") and "reproduced" in row
    sdri = [[t["eval"].si_sdri.iloc[-1] for t in arm] for arm in (a, b)]
    welch = stats.ttest_ind(*sdri, equal_var=False).confidence_interval(0.95)
    row = next(line for line in text.splitlines() if "separates held-out mixtures" in line)
    assert f"[{welch.low:.3g}, {welch.high:.3g}]" in row and "**reproduced**" in row
    hours = ROWS * EVERY - EVERY  # steps
    assert f"{hours:,} steps of batch 8 x 0.512 s" in text
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    block = readme.read_text()
    assert "old text" not in block and block.endswith("\n\nmore\n") and "**reproduced**" in block
    # regenerating from the same runs gives the same document, byte for byte
    again = dyn("study", *sorted(p for p in root.iterdir() if p.is_dir()), "--out", tmp_path / "again.md")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.md").read_text() == text.replace("study.png", "again.png")


@pytest.mark.parametrize(
    "low, high, better, expected",
    [
        (-2.0, -0.1, "lower", "reproduced"),
        (0.1, 2.0, "lower", "contradicted"),
        (-1.0, 1.0, "lower", "inconclusive"),
        (0.1, 2.0, "higher", "reproduced"),
        (-2.0, -0.1, "higher", "contradicted"),
        (float("nan"), float("nan"), "higher", "inconclusive"),
    ],
)
def test_verdict_is_decided_by_the_interval(low, high, better, expected):
    assert verdict(low, high, better) == expected


def test_study_needs_two_arms(sweep, tmp_path):
    root, _ = sweep
    result = dyn("study", root / "mi-p10-s0", root / "mi-p10-s1", "--out", tmp_path / "s.md")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "two arms" in result.stderr
    assert not (tmp_path / "s.md").exists()
    assert re.search(r"error: .*two arms", result.stderr)


def test_the_arm_without_clipping_may_be_noclip(sweep):
    """One rule (dynamics.stats.never_clips) picks the unclipped arm: NoClip as well as p = 100."""
    from dynamics.run import load_run
    from figures.study import study

    root, _ = sweep
    runs = [load_run(p) for p in sorted(root.iterdir()) if p.is_dir()]
    for run in runs:
        if run.config["clipper"]["p"] == 100:
            run.config["clipper"] = {"kind": "NoClip", "nonfinite": "error"}
    document, _ = study(runs)
    assert "Arms: **autoclip p=10** (3 seeds) and **none** (3 seeds)." in document
