#!/usr/bin/env bash
# Run THERE, on the GPU machine, after benchmarks/gpu_prepare.sh filled .gpu/ here: the device tool's
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
# Proves the CUDA fp16 path (pytest -m gpu: tiny fp16 runs, their exports predicting on a CPU-only process), then
# times the default recipe on the labelled real images while sampling GPU utilisation, and prints a summary.
# Everything it keeps lands in $OUT (at most 8 files come back): gpu_check.log, gpu_util.csv and the run's
# config.json, metrics.json, history.csv and report.html (every plot, embedded).
# The whole script stays under GPU_CHECK_SECONDS (default 450): each step gets what is left of it.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
tee_pid=$!
RUN= sampler=
keep_results() {  # the run folder holds more files than come back: these say it all (report.html embeds the plots)
    [ -n "$RUN" ] || return 0
    for f in config.json metrics.json history.csv report.html; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
}
finish() {  # on any exit, a timeout's too: keep what the run wrote, stop the sampler, let tee write the log's end
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
    keep_results
    exec >&- 2>&-
    wait "$tee_pid"
}
trap finish EXIT
BUDGET=${GPU_CHECK_SECONDS:-450}
SECONDS=0
failed=()
step() { echo; echo "== [${SECONDS}s] $*"; }
left() {  # seconds left in the budget, less a reserve; at least 30 (timeout reads 0 as no limit)
    local n=$((BUDGET - SECONDS - ${1:-0}))
    echo $((n < 30 ? 30 : n))
}

step "install the carried wheels"
[ -d .gpu/whl ] || { echo "error: no .gpu/whl; run bash benchmarks/gpu_prepare.sh here and carry .gpu"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || { echo "error: installing .gpu/whl failed"; exit 2; }
# A carried wheel's requirement that the machine's own copy misses (too old, or absent) is met from .gpu/whl-extra
# where that folder has the package; the others are only listed (fastai names spacy, fasthtml uvicorn: the package
# imports neither).
fallbacks=$(python3 - /tmp/site .gpu/whl-extra <<'PY'
import importlib.metadata as md, re, sys
from pathlib import Path
from packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
site, extra = sys.argv[1], {norm(p.name.split("-")[0]): p for p in Path(sys.argv[2]).glob("*.whl")}
carried = list(md.distributions(path=[site]))
names = {norm(d.metadata["Name"]) for d in carried}
for d in carried:
    for req in map(Requirement, d.requires or []):
        name = norm(req.name)
        if name in names or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try: have = md.version(req.name)
        except md.PackageNotFoundError: have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            fix = f"; installing the carried {extra[name].name}" if name in extra else ""
            print(f"unmet: {d.metadata['Name']} needs {req}; the machine has {have or 'none'}{fix}", file=sys.stderr)
            if fix: print(extra[name])
PY
)
if [ -n "$fallbacks" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $(sort -u <<<"$fallbacks") || { echo "error: installing .gpu/whl-extra failed"; exit 2; }
fi
# The package is not pip-installed there: it is imported from this checkout.
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg

step "machine"
nvidia-smi
# Every module the package imports, imported once: a missing or broken package fails here, in seconds.
python3 - <<'EOF' || { echo "error: the package does not import here; see above"; exit 2; }
import importlib.metadata as md, platform
import fastai, timm, torch
import fastai.vision.all, fracture_fastai.cam, fracture_fastai.evaluate, fracture_fastai.predict, fracture_fastai.report
import fracture_fastai.run, fracture_fastai.train
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"timm {timm.__version__}, fastai {fastai.__version__}, fracture_fastai from {fracture_fastai.__file__}")
print(" ".join(f"{n} {md.version(n)}" for n in ("numpy", "pandas", "matplotlib", "scikit-learn", "opencv-python-headless",
                                               "scikit-image", "pillow", "anyio", "typing_extensions")))
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

step "pytest -m gpu (fp16 on CUDA, export predicting on the CPU)"
timeout -k 10 "$(left 240)" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu tests/test_gpu.py 2>&1 | tee /tmp/gpu_pytest.out
rc=$?
summary=$(tail -n 1 /tmp/gpu_pytest.out)
# Skipped tests prove nothing here: on this machine every one of them must run and pass.
if [ $rc -ne 0 ] || ! grep -q "passed" <<<"$summary" || grep -qE "skipped|failed|error" <<<"$summary"; then
    failed+=("pytest (rc $rc: $summary)")
fi

step "default recipe: tf_efficientnet_lite0, precision auto (fp16), labelled real images"
DATA=.gpu/data/bone-fracture-yolo8
RUN=$(mktemp -d /tmp/gpu-run.XXXX)/run  # not under $OUT: a run folder holds more files than come back
# timestamped, so that the summary can keep the samples taken while the model trained
nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_util.csv" &
sampler=$!
start=$SECONDS
timeout -k 10 "$(left 20)" python3 -m fracture_fastai.run --arch tf_efficientnet_lite0 --data "$DATA" --out "$RUN"
rc=$?
wall=$((SECONDS - start))
kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; sampler=
keep_results
[ $rc -eq 0 ] || failed+=("default recipe (rc $rc$([ $rc -eq 124 ] && echo ': out of time'))")

step "summary"
python3 - "$RUN" "$OUT/gpu_util.csv" "$wall" <<'EOF'
import json, statistics, sys
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

run, util_csv, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
print(f"wall time of the run: {wall / 60:.1f} min")
config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
print(f"status {config.get('status')}, precision {config.get('precision')}, device {config.get('device')}, "
      f"weights {config.get('weights')}, workers {config.get('data', {}).get('num_workers')}")
if (run / "metrics.json").exists():
    v = json.loads((run / "metrics.json").read_text())["valid"]
    lo, hi = v["accuracy_ci95"]
    print(f"validation accuracy {v['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), macro-F1 {v['macro_f1']:.3f}, n={v['n']}")
phases = config.get("phases", {})
print("phases (s):", json.dumps(phases))

n_img = config.get("data", {}).get("images_per_epoch")
if (run / "history.csv").exists() and n_img:
    h = pd.read_csv(run / "history.csv")
    h["images_per_s"] = (n_img / h.seconds).round(1)
    print(f"training images per epoch: {n_img} (epoch seconds include the validation pass)")
    print(h[["epoch", "phase", "seconds", "images_per_s", "valid_loss", "accuracy"]].to_string(index=False))
    later = h.images_per_s.iloc[1:] if len(h) > 1 else h.images_per_s  # the first epoch also fills the cache
    print(f"images/s: median {later.median():.0f} over epochs 2+ (first epoch {h.images_per_s.iloc[0]:.0f})")

samples = []  # (time, utilisation %)
for line in util_csv.read_text().splitlines() if util_csv.exists() else []:
    try:
        stamp, value = (s.strip() for s in line.split(",")[:2])
        samples.append((datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f"), float(value)))
    except ValueError:
        continue
def report(name, values):
    if values: print(f"GPU utilisation {name}: mean {statistics.mean(values):.0f} %, "
                     f"median {statistics.median(values):.0f} % ({len(values)} samples at 0.5 s)")
    else: print(f"GPU utilisation {name}: no samples")
report("over the whole run", [u for _, u in samples])
# config's 'started' is written after the data phase; then come the learner and train (lr_find + epochs) phases
if config.get("started") and "train" in phases:
    train_start = datetime.fromisoformat(config["started"]) + timedelta(seconds=phases.get("learner", 0))
    epochs_start = train_start + timedelta(seconds=phases.get("lr_find", 0))
    train_end = train_start + timedelta(seconds=phases["train"])
    report("while training (lr_find + epochs)", [u for t, u in samples if train_start <= t <= train_end])
    report("during the epochs (after lr_find)", [u for t, u in samples if epochs_start <= t <= train_end])
EOF

step "done in ${SECONDS}s"
ls -l "$OUT"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu check: all passed"
