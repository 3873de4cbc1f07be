"""The documented fracture-or-not recipe on the shared FracAtlas, against the issue's targets (test AUROC >= 0.90,
pointing game on the true positives >= 0.5, at most 40 minutes on a 2-core CPU). Prints the validation split's AUROC
and pointing game (what chose the recipe), then test AUROC [95 % CI], sensitivity at 90 % specificity, pointing game
and minutes; asserts nothing.

    python benchmarks/bench_fracatlas.py [--out DIR] [--data PATH] [--seeds S [S ...]] [-- extra run options]

The recipe (README, "Fracture or not"), chosen on the validation split: two trainings of `--recipe fracture`
(`fracture_fastai.run.RECIPES`) with the body's high-resolution front kept at its ImageNet weights (`--freeze-stride
4`) and 1 + 5 epochs, seeds 42 and 43 on seed 42's split (`--split-seed`); each keeps its best epoch by validation
loss and, where that is not its last, its last epoch too (`--keep-last`: a second model from the same training, the
run's `last_epoch/`). All these models' mean probabilities are scored as one model (`stats.ensemble_binary`, what
`predict MODEL --ensemble OTHER ...` outputs) and their Grad-CAMs averaged as its heat map (each training's own
pointing game beside it; each map mirror-averaged, as the recipe's flip TTA averages the probabilities). `--seeds`
trains other seeds (all on the first one's split; one seed: one training); extra run options after `--` override
the recipe's (`-- --freeze-stride 0 --epochs 4 --no-keep-last` gives `--recipe fracture` as it stands). Sensitivity at
90 % specificity is the test split's, at the threshold chosen for 90 % specificity on the validation split
(`--operating-point spec=0.90`), as a deployed model would be used. The minutes are all the trainings' and the
ensemble's scoring; `--out DIR` leaves the run folders there (DIR/seed-S each, and the ensemble's metrics as
DIR/ensemble.json, as `compare --ensemble` writes them).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from _runs import timed_run  # benchmarks/_runs.py, beside this script

TARGET_AUROC, TARGET_POINTING_TP, TARGET_MINUTES = 0.90, 0.5, 40.0
RECIPE = ["--recipe", "fracture", "--freeze-stride", "4", "--epochs", "5", "--keep-last"]
SEEDS = [42, 43]


def _ci(value, ci) -> str:
    if value is None: return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


def _pointing(metrics: dict, split: str) -> str:
    loc, loc_tp = metrics[split].get("localisation") or {}, metrics[split].get("localisation_tp") or {}
    return (f"true positives {_ci(loc_tp.get('pointing_game'), loc_tp.get('pointing_game_ci95'))} (n={loc_tp.get('n', 0)}, "
            f"target >= {TARGET_POINTING_TP}), all positives {_ci(loc.get('pointing_game'), loc.get('pointing_game_ci95'))} "
            f"(n={loc.get('n', 0)})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fracatlas"))
    p.add_argument("--out", default=None, help="leave the run folder here (several seeds: DIR/seed-S each); "
                                               "default runs/<timestamp>-<arch>")
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS,
                   help="one model per seed, all on the first seed's split, scored as one ensemble (one seed: one model)")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not (Path(args.data) / "dataset.csv").exists():
        sys.exit(f"skipped: FracAtlas absent ({args.data} not found; it sits beside the project as ../shared/data)")
    seeds = args.seeds
    if len(set(seeds)) < len(seeds): sys.exit(f"--seeds {' '.join(map(str, seeds))}: give each seed once")
    runs, minutes = [], 0.0
    for seed in seeds:
        member = ["--seed", seed, "--split-seed", seeds[0]]
        out = args.out if len(seeds) == 1 or not args.out else Path(args.out) / f"seed-{seed}"
        run_dir, took = timed_run(["--data", args.data, *RECIPE, *member, *extra] + (["--out", out] if out else []))
        runs.append(run_dir); minutes += took
    start = time.time()
    # --keep-last: a run whose monitor kept an earlier epoch holds its last epoch as a second model (last_epoch/)
    models = [m for r in runs for m in (r, r / "last_epoch") if (m / "model.json").is_file()]
    members = [json.loads((r / "metrics.json").read_text()) for r in runs]
    split = "test" if "test" in members[0] else "valid"
    if len(models) > 1:
        from fracture_fastai.evaluate import write_json
        from fracture_fastai.runtime import tune_malloc
        from fracture_fastai.stats import ensemble_binary
        tune_malloc()  # as the command lines do: the members' Grad-CAMs at 320 px
        ensemble = ensemble_binary(models, localisation=True)
        if args.out: write_json(ensemble, Path(args.out) / "ensemble.json")
        b = ensemble[split]
        alone = [json.loads((m / "metrics.json").read_text())[split]["binary"]["auroc"] for m in models]
        print(f"\nensemble of {len(models)} models, {len(runs)} training(s) (seeds {', '.join(map(str, seeds))}) on the "
              f"split of seed {seeds[0]}: " + ", ".join(f"{m.relative_to(runs[0].parent)} {a:.3f}"
                                                        for m, a in zip(models, alone)) + f" {split} AUROC alone")
    else:
        b = members[0][split]["binary"]
    minutes += (time.time() - start) / 60
    scored = ensemble if len(models) > 1 else members[0]
    if split != "valid":
        v = scored["valid"] if len(models) > 1 else scored["valid"]["binary"]  # an ensemble's scores are flat
        print(f"\nvalid, what the recipe is chosen on ({v['n']} images): AUROC {_ci(v['auroc'], v['auroc_ci95'])}; "
              f"pointing game: {_pointing(scored, 'valid')}")
    print(f"\n{split} ({b['n']} images, {b['n_positive']} {b['positive']}), run folder(s) {', '.join(map(str, runs))}")
    print(f"AUROC {_ci(b['auroc'], b['auroc_ci95'])} (target >= {TARGET_AUROC}: ratio {b['auroc'] / TARGET_AUROC:.3f})")
    print(f"sensitivity {_ci(b['sensitivity'], b['sensitivity_ci95'])} at specificity "
          f"{_ci(b['specificity'], b['specificity_ci95'])} (threshold {b['threshold']:.3f}, chosen on valid for spec 0.90)")
    if len(models) > 1:
        print("pointing game (the members' Grad-CAMs averaged): " + _pointing(ensemble, split))
    for seed, m in zip(seeds, members):
        print("pointing game" + (f" (seed {seed}'s kept epoch's Grad-CAM alone)" if len(models) > 1 else "") + ": "
              + _pointing(m, split))
    print(f"accuracy {b['accuracy']:.3f} vs {b['baseline_accuracy']:.3f} calling every image {b['negative']}")
    print(f"minutes {minutes:.1f} (target <= {TARGET_MINUTES:.0f}: ratio {minutes / TARGET_MINUTES:.3f})")
    # The same trainings are deterministic but this CPU's speed is not: the epochs' own rate tells a slow day apart.
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    epochs = [(c["data"]["images_per_epoch"], s) for c in configs for s in c["phases"]["epochs"]]
    seconds = sum(s for _, s in epochs)
    print(f"of which epochs {seconds / 60:.1f} min: {len(epochs)} epochs of {min(s for _, s in epochs):.0f}-"
          f"{max(s for _, s in epochs):.0f} s, {sum(n for n, _ in epochs) / seconds:.1f} training images/s")


if __name__ == "__main__":
    main()
