"The benchmark scripts run end to end on tiny generated data (their real runs are documented in the README, not here)."
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_fracatlas_scores_a_seed_ensemble_on_one_split(tmp_path, fracatlas_maker):
    data = fracatlas_maker(tmp_path / "fa", n_fractured=12, n_normal=24)
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fracatlas.py"), "--data", str(data), "--out", str(out),
                          "--seeds", "5", "7", "--", "--arch", "cnn", "--size", "32", "--epochs", "3", "--lr", "1e-3",
                          "--bs", "8", "--cam-loss", "0", "--freeze-stride", "0", "--monitor", "auroc"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    configs = [json.loads((out / f"seed-{s}" / "config.json").read_text())["options"] for s in (5, 7)]
    assert [c["seed"] for c in configs] == [5, 7] and [c["split_seed"] for c in configs] == [5, 5]
    from fracture_fastai.stats import ensemble_binary
    # --keep-last (the recipe's): a training that kept an earlier epoch adds its last one. On these easy images the
    # validation AUROC is 1 from the first epoch on, and a tie keeps the earlier epoch: both trainings add one
    models = [m for s in (5, 7) for m in (out / f"seed-{s}", out / f"seed-{s}" / "last_epoch") if (m / "model.json").is_file()]
    assert [json.loads((out / f"seed-{s}" / "config.json").read_text())["training"]["best_epoch"] for s in (5, 7)] == [0, 0]
    assert len(models) == 4
    expected = ensemble_binary(models)["test"]
    saved = json.loads((out / "ensemble.json").read_text())
    assert saved["test"]["auroc"] == expected["auroc"] and "localisation_tp" in saved["valid"]
    lines = res.stdout.splitlines()
    assert any(line.startswith(f"valid, what the recipe is chosen on ({saved['valid']['n']} images): AUROC "
                               f"{saved['valid']['auroc']:.3f}") for line in lines)
    assert any(line.startswith("ensemble of 4 models, 2 training(s) (seeds 5, 7) on the split of seed 5") for line in lines)
    assert f"AUROC {expected['auroc']:.3f}" in res.stdout and f"(threshold {expected['threshold']:.3f}" in res.stdout
    assert sum(line.startswith("pointing game (seed") for line in lines) == 2 and lines[-2].startswith("minutes ")
    runs = [json.loads((out / f"seed-{s}" / "config.json").read_text()) for s in (5, 7)]
    seconds = [e for c in runs for e in c["phases"]["epochs"]]  # the epochs' rate: what a slow CPU day shows in
    rate = sum(c["data"]["images_per_epoch"] * len(c["phases"]["epochs"]) for c in runs) / sum(seconds)
    assert lines[-1].startswith(f"of which epochs {sum(seconds) / 60:.1f} min: {len(seconds)} epochs of ")
    assert lines[-1].endswith(f", {rate:.1f} training images/s")
    assert saved["runs"] == [str(m) for m in models]
    assert any(line.startswith("pointing game (the members' Grad-CAMs averaged): true positives") for line in lines)
