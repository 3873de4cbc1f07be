"""The sweep: option parsing without training, an Optuna search with a stand-in run, and one real 2 x 2 sweep on the
demo that is interrupted and resumed."""
import json
import os
import signal
import subprocess
import sys

import optuna
import pytest

from fracture_fastai import sweep
from fracture_fastai.errors import UserError

TINY = ["--size", "32", "--epochs", "1", "--sample", "4", "--lr", "1e-3", "--num-workers", "0"]


def test_comma_separated_run_options_and_vary_become_axes():
    args, plain, axes = sweep.parse_sweep(["--arch", "cnn,resnet18", "--vary", "no_clahe=false,true", "--size", "32",
                                           "--no-tta", "--seeds", "2", "--seed", "7"])
    assert [repr(a) for a in axes] == ["arch=cnn,resnet18", "no_clahe=false,true"]
    assert plain == ["--size", "32", "--no-tta", "--seed", "7"] and args.first_seed == 7
    points = sweep.grid_points(axes, [7, 8])
    assert len(points) == 8 and points[0] == {"arch": "cnn", "no_clahe": "false", "seed": 7}
    assert sweep.point_name(points[-1]) == "arch-resnet18_no_clahe-true_seed-8"


def test_values_become_the_run_options_tokens():
    assert sweep._flag_tokens("no_clahe", "true") == ["--no-clahe"]
    assert sweep._flag_tokens("no_clahe", "false") == []
    assert sweep._flag_tokens("cache", "false") == ["--no-cache"]  # --x/--no-x options
    assert sweep._flag_tokens("tta", "flip") == ["--tta", "flip"]


@pytest.mark.parametrize("argv, message", [
    (["--vary", "no_clahe"], "expected OPTION=a,b"),
    (["--vary", "tta=flip"], "two or more different values"),
    (["--vary", "lr=1e-4..1e-2:log"], "needs --search random or tpe"),
    (["--search", "tpe", "--vary", "lr=1e-4..1e-2:log"], "needs --trials N"),
    (["--vary", "tta=flip,sideways"], "invalid choice: 'sideways'"),  # every value checked by run's own parser
    (["--arch", "cnn,nonet"], "nonet"),
    (["--bogus", "1", "--seeds", "2"], "unrecognized arguments: --bogus"),
    (["--size", "32"], "nothing to sweep"),
    (["--vary", "seed=1,2"], "--seeds N"),
    (["--seeds", "0", "--vary", "tta=flip,none"], "--seeds must be at least 1"),
])
def test_bad_sweeps_fail_before_any_training(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.parse_sweep(argv)


def test_search_draws_in_ranges_and_resumes_to_the_asked_number(tmp_path, monkeypatch):
    seen = []

    def fake_run_point(plain, params, folder, sweep_dir, trial=None):  # a stand-in run: the score is a function of lr
        seen.append((folder.name, params))
        return 1 - abs(float(params["lr"]) - 3e-3)
    monkeypatch.setattr(sweep, "run_point", fake_run_point)
    argv = ["--search", "tpe", "--trials", "3", "--vary", "lr=1e-4..1e-2:log", "--vary", "tta=flip,none",
            "--seeds", "2", "--out", str(tmp_path / "s"), "--arch", "cnn"]
    sweep.run_sweep(argv)
    assert len(seen) == 6 and seen[0][0] == "trial-0000_seed-42" and seen[1][0] == "trial-0000_seed-43"
    assert all(1e-4 <= float(p["lr"]) <= 1e-2 and p["tta"] in ("flip", "none") for _, p in seen)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    sweep.run_sweep(argv)  # again: the 3 asked for are there, nothing more runs
    assert len(seen) == 6


def _finished(root):
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()
                  and json.loads((p / "config.json").read_text())["status"] == "done")


def test_sweep_on_the_demo_resumes_after_an_interruption(tmp_path, held_process):
    out = tmp_path / "sweep"
    args = ["--arch", "cnn", "--vary", "no_clahe=false,true", "--seeds", "2", "--out", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    # Ctrl-C as the second run starts training: the first is done, the second has its folder and must go on later.
    first = held_process("fracture_fastai.sweep", args, "fit:no_clahe-false_seed-43", env=env,
                         stdout=open(log, "w"), stderr=subprocess.STDOUT)
    first.send_signal(signal.SIGINT)
    assert first.wait(60) == 130, log.read_text()
    done_before = _finished(out)
    assert done_before == ["no_clahe-false_seed-42"]
    started = json.loads((out / done_before[0] / "config.json").read_text())["started"]

    r = subprocess.run([sys.executable, "-m", "fracture_fastai.sweep", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "4 runs, 1 finished before, 3 to do" in r.stdout
    assert _finished(out) == ["no_clahe-false_seed-42", "no_clahe-false_seed-43", "no_clahe-true_seed-42",
                              "no_clahe-true_seed-43"]
    assert json.loads((out / done_before[0] / "config.json").read_text())["started"] == started  # kept, not rerun
    assert "--- no_clahe-false_seed-43: resuming" in r.stdout  # the interrupted run went on (run --resume)
    assert json.loads((out / "no_clahe-false_seed-43" / "config.json").read_text())["resumed"]
    assert "Configurations over seeds" in r.stdout and "McNemar per seed pair" in r.stdout
    assert "no_clahe=True vs no_clahe=False, valid, 24 images x 2 seed(s)" in r.stdout
    for run in _finished(out):
        assert (out / run / "predictions.csv").is_file()


def test_pruning_reports_training_epochs_and_stops_a_trial_below_the_median():
    from types import SimpleNamespace
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={0: 0.9, 1: 0.9}, params={},
                                                  distributions={}))
    trial = study.ask()
    cb = sweep._pruning_callback(trial)
    cb.learn = SimpleNamespace(recorder=SimpleNamespace(metric_names=["epoch", "train_loss", "valid_loss", "accuracy",
                                                                      "time"], log=[0, 1.0, 1.0, 0.1, "00:01"]))
    cb.before_epoch(); cb.after_epoch()  # get_preds' epoch: nothing trained, nothing reported
    cb.before_epoch(); cb.after_train(); cb.after_epoch()  # epoch 0: reported, still in the warm-up
    with pytest.raises(optuna.TrialPruned, match="pruned after epoch 2: accuracy 0.100"):
        cb.before_epoch(); cb.after_train(); cb.after_epoch()
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {0: 0.1, 1: 0.1}
