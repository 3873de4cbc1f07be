"""Benchmark of issue 'runner': the default run of an arch on the real export, against the targets
(>= 85 % validation accuracy, < 60 minutes on a 2-core CPU). Prints measured ratios; asserts nothing.

    python benchmarks/bench_accuracy.py [--arch tf_efficientnet_lite0] [--data ../shared/data/bone-fracture-yolo8] [-- extra run options]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGET_ACCURACY, TARGET_MINUTES = 0.85, 60.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bone-fracture-yolo8"))
    p.add_argument("--out", default=None, help="run folder; default runs/<timestamp>-<arch>")
    args, extra = p.parse_known_args()
    if not Path(args.data).exists():
        sys.exit(f"skipped: real data absent ({args.data} not found; it sits beside the project as ../shared/data)")
    cmd = [sys.executable, "-m", "fracture_fastai.run", "--arch", args.arch, "--data", args.data] + extra
    cmd += ["--out", args.out] if args.out else []
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    minutes = (time.time() - start) / 60
    sys.stdout.write(res.stdout)
    if res.returncode:
        sys.exit(f"run failed with exit code {res.returncode}")
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    valid = json.loads((run_dir / "metrics.json").read_text())["valid"]
    lo, hi = valid["accuracy_ci95"]
    print(f"\narch {args.arch}, run folder {run_dir}")
    print(f"validation accuracy {valid['accuracy']:.4f} (95% CI {lo:.3f}-{hi:.3f}, n={valid['n']}), "
          f"macro-F1 {valid['macro_f1']:.4f}")
    print(f"accuracy / target {TARGET_ACCURACY:.2f}: {valid['accuracy'] / TARGET_ACCURACY:.3f}")
    print(f"wall time {minutes:.1f} min; time / target {TARGET_MINUTES:.0f} min: {minutes / TARGET_MINUTES:.3f}")


if __name__ == "__main__":
    main()
