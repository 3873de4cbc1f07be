"""`python -m fracture_fastai.sweep --arch cnn,resnet18 --vary no_clahe=false,true --seeds 3 --out DIR`: a grid or
an Optuna search over run options, each point a normal run folder under DIR, then the paired comparison.

Optuna's study holds the trials (SQLite in DIR by default, any database URL with --storage): the grid is its trial
queue, so an interrupted sweep, started again with the same line, re-queues exactly the points without a finished
trial. Every option that is not the sweep's own goes to `python -m fracture_fastai.run` as it is.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from datetime import datetime
from itertools import product
from pathlib import Path

from .errors import ArgumentParser, UserError, cli_errors

__all__ = ["Axis", "parse_sweep", "grid_points", "point_name", "run_point", "run_sweep", "sweep_report", "main"]

SEED = 42  # first seed when the run options give no --seed
METRIC = "accuracy"  # what a trial scores and pruning watches: validation accuracy


class Axis:
    "One swept run option: a list of values (grid or categorical choice) or a numeric range (random/TPE search)."
    def __init__(self, name: str, values=None, low=None, high=None, log: bool = False):
        self.name, self.values, self.low, self.high, self.log = name, values, low, high, log

    @property
    def is_range(self) -> bool: return self.values is None

    def suggest(self, trial):
        "This axis's value for an Optuna `trial`, as the text a command line would carry."
        if not self.is_range:
            return trial.suggest_categorical(self.name, self.values)
        if isinstance(self.low, int) and isinstance(self.high, int) and not self.log:
            return str(trial.suggest_int(self.name, self.low, self.high))
        return f"{trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log):.6g}"

    def __repr__(self):
        return f"{self.name}={','.join(self.values)}" if not self.is_range else f"{self.name}={self.low}..{self.high}"


def _number(text: str, where: str):
    try: return int(text)
    except ValueError: pass
    try: return float(text)
    except ValueError: raise UserError(f"{where}: {text!r} is not a number") from None


def _vary(text: str) -> Axis:
    "--vary OPT=a,b,c (values) or OPT=LOW..HIGH[:log] (a range for random/TPE search)."
    name, sep, values = text.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not sep or not name or not values:
        raise UserError(f"--vary {text!r}: expected OPTION=a,b (values) or OPTION=LOW..HIGH[:log] (a range)")
    if ".." in values:
        span, _, scale = values.partition(":")
        if scale not in ("", "log"):
            raise UserError(f"--vary {text!r}: a range ends in ':log' or nothing, not {scale!r}")
        low, _, high = span.partition("..")
        low, high = _number(low, f"--vary {text}"), _number(high, f"--vary {text}")
        if not low < high or (scale and low <= 0):
            raise UserError(f"--vary {text!r}: need LOW < HIGH (and LOW > 0 on a log scale)")
        return Axis(name, low=low, high=high, log=bool(scale))
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if len(vals) < 2 or len(set(vals)) < len(vals):
        raise UserError(f"--vary {text!r}: give two or more different values, comma-separated")
    return Axis(name, values=vals)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fracture_fastai.sweep", allow_abbrev=False,
        description="Sweep run options with Optuna: every point is a run folder under --out; then the paired "
                    "comparison of configurations that differ in one option. Any other option goes to "
                    "python -m fracture_fastai.run; a comma-separated value (--arch cnn,resnet18) is swept.",
        epilog="Started again with the same line, an interrupted sweep keeps its finished runs and does the rest.")
    p.add_argument("--out", default=None, help="sweep folder; default: sweeps/<timestamp>")
    p.add_argument("--vary", action="append", default=[], metavar="OPT=VALUES",
                   help="a run option to sweep: OPT=a,b (e.g. no_clahe=false,true) or OPT=LOW..HIGH[:log] for a search")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration: --seed, --seed+1, ...")
    p.add_argument("--search", choices=["grid", "random", "tpe"], default="grid",
                   help="grid: every combination; random/tpe: --trials configurations drawn by Optuna")
    p.add_argument("--trials", type=int, default=None, help="random/tpe: configurations to try")
    p.add_argument("--storage", default=None, help="Optuna storage URL (e.g. postgresql://...); default: SQLite in --out")
    p.add_argument("--study", default="sweep", help="Optuna study name in the storage")
    p.add_argument("--prune", action="store_true",
                   help="stop hopeless trials early: Optuna's median pruner on the per-epoch validation accuracy")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once, each in its own process")
    p.add_argument("--split", choices=["valid", "test"], default="valid", help="images of the paired comparison")
    return p


def _grid_from_run_options(rest: list) -> tuple:
    "Run options with a comma-separated value become axes: `(plain options, axes)`."
    plain, axes, i = [], [], 0
    while i < len(rest):
        tok = rest[i]
        name, eq, value = tok.partition("=")
        if tok.startswith("--") and not eq and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 1
        if tok.startswith("--") and "," in value:
            axes.append(_vary(f"{name}={value}"))
        elif tok.startswith("--") and value and not eq:
            plain += [tok, value]
        else:
            plain.append(tok)
        i += 1
    return plain, axes


def _flag_tokens(name: str, value: str) -> list:
    "The command-line tokens that set run option `name` to `value`: a flag's presence for true/false, else `--name value`."
    from .run import parse_args
    opt = "--" + name.replace("_", "-")
    if value.lower() in ("true", "false"):
        def parses(tokens):
            try: parse_args(tokens); return True
            except (UserError, SystemExit): return False
        if parses([opt]):  # a flag (store_true, or --x/--no-x)
            if value.lower() == "true": return [opt]
            negative = "--no-" + opt[2:]
            return [negative] if parses([negative]) else []
    return [opt, value]


def parse_sweep(argv=None) -> tuple:
    "`(sweep options, run options that stay fixed, axes)`, every point's run options checked before anything runs."
    args, rest = _parser().parse_known_args(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("the sweep needs Optuna: pip install 'fracture_fastai[sweep]'") from None
    from .run import parse_args
    if args.seeds < 1: raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1: raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    plain, axes = _grid_from_run_options(rest)
    axes += [_vary(v) for v in args.vary]
    names = [a.name for a in axes]
    if len(set(names)) < len(names):
        raise UserError(f"an option is swept twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if "seed" in names:
        raise UserError("sweep seeds with --seeds N (and --seed for the first), not --vary seed")
    base = parse_args(plain)  # run options that stay fixed: a typo fails here, in one line
    args.first_seed = base.seed
    ranges = [a for a in axes if a.is_range]
    if args.search == "grid" and ranges:
        raise UserError(f"a range ({ranges[0]!r}) needs --search random or tpe with --trials N; a grid takes values a,b")
    if args.search != "grid" and not (args.trials and args.trials >= 1):
        raise UserError(f"--search {args.search} needs --trials N (configurations to try)")
    if not axes and args.seeds == 1:
        raise UserError("nothing to sweep: give --vary OPT=a,b, a comma-separated run option or --seeds N")
    for a in axes:
        if a.name == "out":
            raise UserError("--out is the sweep folder; it cannot be swept")
        for value in a.values or [str(a.low), str(a.high)]:
            parse_args(plain + _flag_tokens(a.name, value))  # every value of every axis, checked now
    return args, plain, axes


def grid_points(axes, seeds) -> list:
    "Every combination of the axes' values, each under every seed: a list of `{option: value, 'seed': int}`."
    combos = product(*(a.values for a in axes)) if axes else [()]
    return [{**{a.name: v for a, v in zip(axes, combo)}, "seed": s} for combo in combos for s in seeds]


def point_name(params: dict, trial: int | None = None) -> str:
    "Run folder name of a point: its swept values and seed ('no_clahe-true_seed-42'), or the trial number in a search."
    parts = [f"trial-{trial:04d}"] if trial is not None else [f"{k}-{v}" for k, v in params.items() if k != "seed"]
    parts.append(f"seed-{params['seed']}")
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts))


def _point_argv(plain: list, params: dict, out: Path) -> list:
    argv = [t for t in plain]
    for name, value in params.items():
        argv += ["--seed", str(value)] if name == "seed" else _flag_tokens(name, str(value))
    return argv + ["--out", str(out)]


def _status(folder: Path) -> str | None:
    try: return json.loads((folder / "config.json").read_text()).get("status")
    except (OSError, ValueError): return None


def _score(folder: Path) -> float:
    return float(json.loads((folder / "metrics.json").read_text())["valid"][METRIC])


def _set_aside(folder: Path, sweep_dir: Path) -> None:
    "An unfinished run folder moves to DIR/.interrupted/ (kept, never deleted) so the point can run again."
    aside = sweep_dir / ".interrupted"
    aside.mkdir(exist_ok=True)
    target = aside / f"{folder.name}-{datetime.now():%Y%m%d-%H%M%S}"
    shutil.move(str(folder), str(target))
    print(f"unfinished run {folder} moved to {target}; running that point again", file=sys.stderr, flush=True)


def _pruning_callback(trial):
    "A training-only Callback reporting each epoch's validation accuracy to `trial`, stopping it when Optuna prunes."
    import optuna
    from .tracking import epoch_metrics

    def report(step, metrics):
        if METRIC not in metrics: return
        trial.report(metrics[METRIC], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {step + 1}: {METRIC} {metrics[METRIC]:.3f}")
    return epoch_metrics(report)


def run_point(plain: list, params: dict, folder: Path, sweep_dir: Path, trial=None) -> float:
    "One run of the sweep in `folder` (reused when it finished before); its validation accuracy."
    from .run import parse_args, run
    cbs = [_pruning_callback(trial)] if trial is not None else []
    if folder.exists() and _status(folder) == "done" and (folder / "metrics.json").is_file():
        return _score(folder)  # finished before an interruption that came before Optuna heard of it
    if folder.exists() and any(folder.iterdir()):
        try:  # an interrupted run goes on from its last epoch's checkpoint (run --resume)
            args = parse_args(["--resume", str(folder)])
        except UserError as e:  # not resumable (failed, or from another version): it is kept aside and run again
            print(f"{folder.name}: {e}", file=sys.stderr, flush=True)
            _set_aside(folder, sweep_dir)
        else:
            print(f"--- {folder.name}: resuming", flush=True)
            run(args, cbs=cbs)
            return _score(folder)
    args = parse_args(_point_argv(plain, params, folder))
    print(f"--- {folder.name}: {' '.join(_point_argv(plain, params, folder))}", flush=True)
    run(args, cbs=cbs)
    return _score(folder)


def _storage(args, sweep_dir: Path) -> str:
    return args.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def _load_study(args, sweep_dir: Path, direction="maximize"):
    import optuna
    sampler = {"grid": None, "random": optuna.samplers.RandomSampler(seed=args.first_seed),
               "tpe": optuna.samplers.TPESampler(seed=args.first_seed)}[args.search]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if args.prune else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=args.study, storage=_storage(args, sweep_dir), load_if_exists=True,
                               direction=direction, sampler=sampler, pruner=pruner)


def _queued(trial) -> bool:
    "Whether `trial` came from the queue (`enqueue_trial`), i.e. carries a grid point."
    from optuna.trial import TrialState
    mine = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number == trial.number]
    return bool(mine and mine[0].system_attrs.get("fixed_params"))


def _objective(args, plain, axes, sweep_dir: Path):
    seeds = [args.first_seed + i for i in range(args.seeds)]

    def objective(trial):
        import optuna
        if args.search == "grid":  # a queued point: its values are fixed, suggest just reads them
            if not _queued(trial):  # another worker took the last queued point first
                raise optuna.TrialPruned("the grid's queue was empty")
            params = {a.name: trial.suggest_categorical(a.name, a.values) for a in axes}
            params["seed"] = trial.suggest_categorical("seed", seeds)
            return run_point(plain, params, sweep_dir / point_name(params), sweep_dir, trial if args.prune else None)
        params = {a.name: a.suggest(trial) for a in axes}
        scores = []
        for i, seed in enumerate(seeds):  # a searched configuration is scored over all its seeds
            point = {**params, "seed": seed}
            pruned_trial = trial if args.prune and i == 0 else None  # one report per epoch: the first seed's
            scores.append(run_point(plain, point, sweep_dir / point_name(point, trial.number), sweep_dir, pruned_trial))
        trial.set_user_attr("scores", scores)
        if not scores: raise optuna.TrialPruned("no seed finished")
        return sum(scores) / len(scores)
    return objective


def _queue_grid(study, axes, seeds, own_storage: bool) -> int:
    """Queue every grid point without a finished or pruned trial (unless queued already); how many are done. With `own_storage` (the sweep folder's
    SQLite) trials a killed sweep left running are marked failed: nothing else can be running them now."""
    import optuna
    from optuna.trial import TrialState
    done, waiting = set(), set()
    for t in study.get_trials(deepcopy=False):
        key = json.dumps(t.params or t.system_attrs.get("fixed_params", {}), sort_keys=True, default=str)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED): done.add(key)
        elif t.state == TrialState.WAITING: waiting.add(key)
        elif t.state == TrialState.RUNNING and own_storage:
            study.tell(t.number, state=TrialState.FAIL)
    n_done = 0
    for point in grid_points(axes, seeds):
        key = json.dumps(point, sort_keys=True, default=str)
        n_done += key in done
        if key not in done and key not in waiting:
            study.enqueue_trial(point)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return n_done


def _worker(argv, sweep_dir: str):
    "One process of `--jobs N`: take queued trials (or new search trials) until none is left."
    import optuna
    from optuna.trial import TrialState
    args, plain, axes = parse_sweep(argv)
    sweep_dir = Path(sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(args, sweep_dir)
    objective = _objective(args, plain, axes, sweep_dir)
    if args.search == "grid":
        while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.optimize(objective, n_trials=1, catch=(Exception,))
    else:
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        left = args.trials - len(study.get_trials(deepcopy=False, states=finished))  # a resumed search does the rest
        if left > 0:  # the callback stops this worker when others have finished the rest
            study.optimize(objective, n_trials=left, catch=(Exception,),
                           callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=finished)])


def run_sweep(argv=None) -> Path:
    "Run the sweep that `argv` describes (or the rest of an interrupted one); its folder."
    args, plain, axes = parse_sweep(argv)
    from .errors import check_writable
    sweep_dir = Path(args.out) if args.out else Path("sweeps") / f"{datetime.now():%Y%m%d-%H%M%S}"
    check_writable(sweep_dir, "--out", folder=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    settings = sweep_dir / "sweep.json"
    line = {"argv": list(sys.argv[1:] if argv is None else argv)}
    if settings.is_file():
        before = json.loads(settings.read_text())
        if _parser().parse_known_args(before["argv"])[0].study == args.study and before["argv"] != line["argv"]:
            print(f"note: resuming the sweep in {sweep_dir}, first started with: {' '.join(before['argv'])}",
                  file=sys.stderr)
    else:
        from .evaluate import write_json
        write_json(line, settings)
    study = _load_study(args, sweep_dir)
    seeds = [args.first_seed + i for i in range(args.seeds)]
    if args.search == "grid":
        n_done = _queue_grid(study, axes, seeds, own_storage=args.storage is None)
        total = len(grid_points(axes, seeds))
        print(f"sweep {sweep_dir}: {total} runs, {n_done} finished before, {total - n_done} to do, "
              f"{args.jobs} at a time", flush=True)
    worker_argv = list(sys.argv[1:] if argv is None else argv)
    if args.jobs == 1:
        _worker(worker_argv, str(sweep_dir))
    else:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads or open SQLite handles
        procs = [ctx.Process(target=_worker, args=(worker_argv, str(sweep_dir))) for _ in range(args.jobs)]
        for p in procs: p.start()
        for p in procs: p.join()
    return sweep_dir


def sweep_report(sweep_dir, split: str = "valid") -> str:
    "What the finished runs of a sweep say: the seed groups and the paired comparisons."
    from .compare import collect_runs, paired_report
    runs = collect_runs([sweep_dir])
    return f"{len(runs)} finished run(s) in {sweep_dir}\n\n" + paired_report(runs, split=split)


@cli_errors
def main(argv=None):
    from .runtime import tune_malloc
    tune_malloc()
    sweep_dir = run_sweep(argv)
    args = _parser().parse_known_args(argv)[0]
    print(sweep_report(sweep_dir, args.split))
    print(sweep_dir)


if __name__ == "__main__":
    main()
