"""The default run of an arch on the real export, against the speed issue's targets (validation accuracy >= 0.861,
at most 6 minutes of wall time on a 2-core CPU). Prints measured values and ratios; asserts nothing.

    python benchmarks/bench_accuracy.py [--arch tf_efficientnet_lite0] [--seeds 1] [-- extra run options]
"""
import argparse
import json
import math
import sys
from pathlib import Path

from _runs import timed_run  # benchmarks/_runs.py, beside this script

TARGET_ACCURACY, TARGET_MINUTES = 0.861, 6.0


def _one_run(args, extra, seed):
    run_dir, minutes = timed_run(["--arch", args.arch, "--data", args.data, "--seed", seed, *extra]
                                 + (["--out", f"{args.out}-seed{seed}" if args.seeds > 1 else args.out] if args.out else []))
    valid = json.loads((run_dir / "metrics.json").read_text())["valid"]
    lo, hi = valid["accuracy_ci95"]
    print(f"seed {seed}: validation accuracy {valid['accuracy']:.4f} (95% CI {lo:.3f}-{hi:.3f}, n={valid['n']}), "
          f"macro-F1 {valid['macro_f1']:.4f}, {minutes:.2f} min, run folder {run_dir}", flush=True)
    return valid["accuracy"], valid["macro_f1"], minutes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bone-fracture-yolo8"))
    p.add_argument("--out", default=None, help="run folder (suffixed -seedN with several seeds); default runs/<timestamp>-<arch>")
    p.add_argument("--seeds", type=int, default=1, help="runs with seeds 42, 43, ...: per-seed values, their mean and spread")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not Path(args.data).exists():
        sys.exit(f"skipped: real data absent ({args.data} not found; it sits beside the project as ../shared/data)")
    results = [_one_run(args, extra, 42 + i) for i in range(args.seeds)]
    acc = [r[0] for r in results]
    mean, minutes = sum(acc) / len(acc), max(r[2] for r in results)
    sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else float("nan")
    print(f"\narch {args.arch}, {len(acc)} seed(s): mean validation accuracy {mean:.4f} (sd {sd:.4f}), "
          f"mean macro-F1 {sum(r[1] for r in results) / len(results):.4f}")
    print(f"accuracy / target {TARGET_ACCURACY}: {mean / TARGET_ACCURACY:.3f}")
    print(f"slowest run {minutes:.2f} min; time / target {TARGET_MINUTES:.0f} min: {minutes / TARGET_MINUTES:.3f}")


if __name__ == "__main__":
    main()
