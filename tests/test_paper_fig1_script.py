"""benchmarks/paper_fig1_gpu.sh, the paper's Fig. 1 on one GPU, run here as its CPU trial: both arms side by
side, Fig. 1 drawn, the summary table filled from the runs, and a non-empty output folder refused."""

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
from helpers import CLI_ENV

from dynamics import load_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_fig1_gpu.sh"
TRIAL = "--hidden 8 --batch-size 2 --n-samples 512 --every 4 --train-mixtures 8 --eval-mixtures 2"


def run_script(out: Path) -> subprocess.CompletedProcess:
    env = {
        **CLI_ENV,
        "OUT": str(out),
        "STEPS": "40",
        "DEVICE": "cpu",
        "DATA": "synthetic",
        "THREADS": "1",
        "PYTHON": sys.executable,
        "EXTRA": TRIAL,
    }
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_fig1_script_records_both_arms_draws_fig1_and_fills_its_table(tmp_path):
    out = tmp_path / "paper"
    done = run_script(out)
    assert done.returncode == 0, done.stdout + done.stderr
    for arm, p in (("autoclip-p10", 10.0), ("p100", 100.0)):
        run = load_run(out / arm)
        assert run.status == "finished" and len(run.steps) == 40
        assert run.config["preset"] == "paper" and run.config["task"]["p"] == p
    compare = pd.read_csv(out / "compare.csv").set_index("run")
    assert sorted(compare.index) == ["autoclip-p10", "p100"]
    assert all(math.isfinite(r) for r in compare.r_value)  # 10 record rows per arm: Fig. 1's r is defined
    assert compare.clipped_fraction["p100"] == 0 and compare.clipped_fraction["autoclip-p10"] > 0
    image = matplotlib.image.imread(out / "fig1.png")
    assert image.shape[0] > 200 and image.shape[1] > 200 and image[..., :3].std() > 0.05  # drawn, not blank
    summary = (out / "summary.md").read_text().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in summary if line.startswith("| ")}
    for arm in ("autoclip-p10", "p100"):
        cells = rows[arm]
        assert cells[1] == "40"  # steps, from the run
        assert f"{compare.r_value[arm]:.4g}" == cells[4]  # r, from compare.csv
    assert "device cpu" in (out / "environment.txt").read_text()

    before = hashlib.sha256((out / "summary.md").read_bytes()).hexdigest()
    again = run_script(out)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"paper_fig1_gpu: {out} is not empty: remove it or set OUT to a new folder"
    ]
    assert hashlib.sha256((out / "summary.md").read_bytes()).hexdigest() == before
