#!/usr/bin/env bash
# The paper's Fig. 1 at the paper's sizes on one GPU: AutoClip (p=10) and no clipping (p=100) recorded side by
# side with `dyn record --preset paper` (2 x 300 BLSTM, mask inference, batch 25, 400-frame segments, Adam 1e-3,
# recorded every 20 steps, sharpness by finite differences), then Fig. 1 (`dyn plot`) and the numbers
# (`dyn compare --csv`: r, final loss, step-size CV, held-out SI-SDRi) in $OUT.
#
# Sized for one 10-minute call: each arm trains for at most TIME_LIMIT minutes (then ends cleanly: final
# evaluation, run finished) or STEPS steps, whichever comes first; start-up, the corpus and the figures take
# the rest. Run from the repository root, with the project installed (pip install -e '.[speech]' and torch):
#
#     bash benchmarks/paper_fig1_gpu.sh                      # OUT=./paper_gpu_out, about 6.5 minutes
#     STEPS=20 DEVICE=cpu EXTRA="--hidden 16 --batch-size 2 --n-samples 2048 --eval-mixtures 4" \
#         bash benchmarks/paper_fig1_gpu.sh                  # a trial of the script itself on CPU
#
# Settings (environment): OUT, STEPS (6000), TIME_LIMIT (minutes per arm, 5), DEVICE (cuda), DATA (speech:
# the built-in corpus; or a WSJ0-2mix folder), THREADS (CPU threads per arm, 2), EXTRA (more dyn record
# options; they override the preset), PYTHON (python).
set -euo pipefail

OUT=${OUT:-./paper_gpu_out}
STEPS=${STEPS:-6000}
TIME_LIMIT=${TIME_LIMIT:-5}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-speech}
THREADS=${THREADS:-2}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
DYN=("$PYTHON" -m cli)

if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "paper_fig1_gpu: $OUT is not empty: remove it or set OUT to a new folder" >&2
    exit 2
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
start=$(date +%s)

"$PYTHON" - "$DEVICE" >"$OUT/environment.txt" <<'EOF'
import platform, sys, torch
device = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}")
if device.startswith("cuda") and torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
EOF
cat "$OUT/environment.txt"

if [ "$DATA" = speech ]; then  # built once (about 10 s), before both arms read it
    "$PYTHON" -c "from dynamics.tasks.separation.speech import load_corpus; load_corpus()"
fi

# shellcheck disable=SC2086  # EXTRA is a list of options
record() {
    "${DYN[@]}" record --preset paper --device "$DEVICE" --data "$DATA" --steps "$STEPS" \
        --time-limit "$TIME_LIMIT" --threads "$THREADS" --p "$1" --out "$OUT/$2" $EXTRA >"$OUT/$2.log" 2>&1
}
record 100 p100 &
unclipped=$!
if ! record 10 autoclip-p10; then
    echo "paper_fig1_gpu: the AutoClip run failed:" >&2
    tail -n 20 "$OUT/autoclip-p10.log" >&2
    kill "$unclipped" 2>/dev/null || true
    exit 1
fi
if ! wait "$unclipped"; then
    echo "paper_fig1_gpu: the unclipped run failed:" >&2
    tail -n 20 "$OUT/p100.log" >&2
    exit 1
fi
trained=$(date +%s)

"${DYN[@]}" plot "$OUT/p100" "$OUT/autoclip-p10" --out "$OUT/fig1.png"
"${DYN[@]}" compare "$OUT/autoclip-p10" "$OUT/p100" --csv >"$OUT/compare.csv"
for arm in autoclip-p10 p100; do
    "${DYN[@]}" info "$OUT/$arm" >"$OUT/info-$arm.txt"
done

# the table docs/scale.md asks for, one row per arm, from the runs and compare.csv
"$PYTHON" - "$OUT" "$((trained - start))" >"$OUT/summary.md" <<'EOF'
import csv, sys
from pathlib import Path
from dynamics import load_run

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
rows = {r["run"]: r for r in csv.DictReader(open(out / "compare.csv"))}
print("| arm | steps | training s | steps/s | r | final loss | step-size CV | SI-SDRi (dB) |")
print("|---|---|---|---|---|---|---|---|")
for arm in ("autoclip-p10", "p100"):
    run, row = load_run(out / arm), rows[arm]
    steps, train_s = len(run.steps), float(run.metrics.time_s.iloc[-1])
    cells = [arm, steps, f"{train_s:.1f}", f"{steps / train_s:.2f}"]
    cells += [f"{float(row[k]):.4g}" for k in ("r_value", "final_loss", "step_size_cv", "final_si_sdri")]
    print("| " + " | ".join(map(str, cells)) + " |")
print(f"\nstart to end of training: {seconds} s")
EOF
cat "$OUT/summary.md"
echo "paper_fig1_gpu: done in $(($(date +%s) - start)) s; figure $OUT/fig1.png, numbers $OUT/compare.csv"
