"""Paired statistics of runs: which runs differ only by seed (mean and CI over seeds), and whether two
configurations differ on the same images (McNemar's test, bootstrap CI of the accuracy and AUROC differences).

It reads run folders (config.json, metrics.json, predictions.csv); the tests themselves are statsmodels' and
scipy's, not our own arithmetic.
"""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from .errors import UserError

__all__ = ["NOT_CONFIG", "mcnemar_test", "bootstrap_ci", "seed_ci", "run_options", "seed_groups", "group_table",
           "differing_options", "paired_comparison", "paired_by_option", "format_paired", "run_probabilities",
           "ensemble_accuracy", "ensemble_binary", "format_ensemble", "suspect_labels"]

# Options that say where or how fast a run went, not what it computed: runs differing only in these (and the seed)
# are repeats of one configuration.
NOT_CONFIG = {"seed", "out", "num_workers", "cache", "resume", "track", "track_uri", "track_experiment"}
EXACT_BELOW = 25  # discordant pairs under which McNemar's test is the exact binomial one (statsmodels' advice)


def mcnemar_test(
    correct_a,  # per image: did configuration A classify it correctly (bools, one per image)
    correct_b,  # the same images, configuration B
) -> dict:
    "McNemar's test of A and B on the same images: discordant counts and the p-value (exact binomial when they are few)."
    from statsmodels.stats.contingency_tables import mcnemar
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b differ in length: {a.size} != {b.size}")
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    discordant = table[0][1] + table[1][0]
    exact = discordant < EXACT_BELOW
    result = mcnemar(table, exact=exact, correction=True)
    return {"n": int(a.size), "only_a": table[0][1], "only_b": table[1][0], "exact": exact,
            "pvalue": float(result.pvalue) if discordant else 1.0}


def bootstrap_ci(
    samples,  # one array per stratum (e.g. per seed), resampled independently; a single array for plain resampling
    statistic,  # function of the resampled arrays (same order) -> float
    n_resamples: int = 5000,
    level: float = 0.95,
    seed: int = 0,  # a fixed seed: the same runs always get the same interval
) -> tuple:
    "Percentile bootstrap interval `(low, high)` of `statistic` (scipy.stats.bootstrap); a point when the data cannot vary."
    from scipy.stats import bootstrap
    samples = [np.asarray(s, dtype=float) for s in samples]
    if all(np.ptp(s) == 0 for s in samples):  # every resample gives the same value: the interval is that point
        v = float(statistic(*samples))
        return v, v
    res = bootstrap(samples, statistic, n_resamples=n_resamples, confidence_level=level, method="percentile",
                    vectorized=False, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def seed_ci(
    values,  # one accuracy (or other share in [0, 1]) per seed
    level: float = 0.95,
) -> tuple:
    "`(mean, low, high)` of per-seed values: Student's t interval over seeds in [0, 1] (NaN bounds with fewer than 2 seeds)."
    from scipy import stats
    v = np.asarray(values, dtype=float)
    mean = float(v.mean()) if v.size else math.nan
    if v.size < 2:
        return mean, math.nan, math.nan
    if np.ptp(v) == 0:
        return mean, mean, mean
    low, high = stats.t.interval(level, v.size - 1, loc=mean, scale=stats.sem(v))
    # Clipped to [0, 1], where accuracies live: with 2-3 seeds t's interval is wide and would spill past the ends.
    return mean, float(max(low, 0.0)), float(min(high, 1.0))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_options(run) -> dict:
    "The options that made `run` what it is: config.json's options without where/how-fast ones (`NOT_CONFIG`)."
    config = _read_json(Path(run) / "config.json")
    opts = {k: v for k, v in config.get("options", {}).items() if k not in NOT_CONFIG}
    opts["data"] = config.get("data", {}).get("path", opts.get("data"))  # 'demo' rather than None
    # Which of the training's epochs the model is: the one its monitor kept, or (a run's last_epoch/) its last
    opts.setdefault("epoch", "kept")
    return opts


def _seed(run) -> int | None:
    return _read_json(Path(run) / "config.json").get("options", {}).get("seed")


def _key(opts: dict) -> str:
    return json.dumps(opts, sort_keys=True, default=str)


def seed_groups(runs) -> list:
    "Runs grouped by configuration (differing only by seed and `NOT_CONFIG`): a list of `(options, [runs by seed])`."
    groups = {}
    for run in map(Path, runs):
        opts = run_options(run)
        groups.setdefault(_key(opts), (opts, []))[1].append(run)
    return [(opts, sorted(members, key=lambda r: (_seed(r) is None, _seed(r) or 0, r.name)))
            for opts, members in groups.values()]


def differing_options(groups) -> list:
    "Options whose value is not the same in every group (what a sweep varied)."
    keys = sorted(set().union(*(opts for opts, _ in groups)))
    return [k for k in keys if len({_key({k: opts.get(k)}) for opts, _ in groups}) > 1]


def _accuracy(run, split: str) -> float:
    v = (_read_json(Path(run) / "metrics.json").get(split) or {}).get("accuracy")
    return float(v) if isinstance(v, (int, float)) else math.nan


def group_table(
    runs,  # finished run folders
    split: str = "valid",  # whose accuracy
) -> pd.DataFrame:
    "One row per configuration: the options that differ between configurations, seeds, mean accuracy and its t CI over seeds."
    groups = seed_groups(runs)
    varied = differing_options(groups)
    rows = []
    for opts, members in groups:
        accs = [_accuracy(r, split) for r in members]
        mean, low, high = seed_ci([a for a in accs if not math.isnan(a)])
        rows.append({**{k: opts.get(k) for k in varied}, "seeds": len(members),
                     "runs": " ".join(r.name for r in members), f"{split}_accuracy_mean": mean,
                     "ci_low": low, "ci_high": high, "per_seed": " ".join(f"{a:.3f}" for a in accs)})
    return pd.DataFrame(rows)


def _predictions(run, split: str) -> pd.DataFrame:
    path = Path(run) / "predictions.csv"
    if not path.is_file():
        raise UserError(f"{run} has no predictions.csv (made by runs of this version); rerun it to compare it paired")
    df = pd.read_csv(path)
    df = df[df.split == split]
    if df.empty:
        raise UserError(f"{path} has no {split} predictions; choose another --split")
    # Indexed by the image's key; `path` keeps the file's path as the run wrote it, for a person to open.
    return df.assign(path=df.file).set_index(_image_keys(df.file, _data_path(run)).rename("file"))


def _data_path(run) -> str | None:
    "The --data of `run` as its config.json records it; None for the demo or an unreadable config."
    try:
        data = json.loads((Path(run) / "config.json").read_text()).get("data", {})
    except (OSError, ValueError):
        return None
    return None if data.get("synthetic_demo") else data.get("path")


def _image_keys(files: pd.Series, data: str | None) -> pd.Series:
    """Each image's path relative to the run's --data folder (or the folder of a --data file), so that runs given the
    same data by another path (relative or absolute, another machine) score the same images; else the path as is."""
    if not data: return files
    roots = [PurePath(data), PurePath(data).parent]
    def key(f):
        for root in roots:
            try: return PurePath(f).relative_to(root).as_posix()
            except ValueError: continue
        return f
    return files.map(key)


def _auroc(labels, scores) -> float:
    "scikit-learn's AUROC of `scores` for the boolean `labels`; NaN when one class is absent."
    from sklearn.metrics import roc_auc_score
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, scores))


def _pair_runs(runs_a, runs_b) -> list:
    "Runs of A and B paired by seed where both have it; else in order (a single run each, for instance)."
    seeds_a, seeds_b = {_seed(r): r for r in runs_a}, {_seed(r): r for r in runs_b}
    common = [s for s in seeds_a if s in seeds_b and s is not None]
    if common:
        return [(seeds_a[s], seeds_b[s], s) for s in sorted(common)]
    return [(a, b, None) for a, b in zip(runs_a, runs_b)]


def paired_comparison(
    runs_a,  # run folders of configuration A (one per seed)
    runs_b,  # run folders of configuration B, paired with A's by seed
    split: str = "valid",  # 'valid' or 'test'
    n_resamples: int = 5000,  # bootstrap resamples
    names: tuple | None = None,  # (A, B) as the report names them; default: their first runs' folder names
) -> dict:
    "B against A on the same images: accuracies, their difference with a paired bootstrap 95 % CI, McNemar per seed pair."
    pairs = _pair_runs(list(map(Path, runs_a)), list(map(Path, runs_b)))
    if not pairs:
        raise UserError("nothing to pair: each side needs at least one finished run")
    diffs, per_seed, auroc_sets = [], [], []
    for a, b, seed in pairs:
        pa, pb = _predictions(a, split), _predictions(b, split)
        files = pa.index.intersection(pb.index)
        if len(files) < len(pa) or len(files) < len(pb):
            raise UserError(f"{a} and {b} scored different {split} images ({len(pa)} and {len(pb)}, {len(files)} in "
                            "common); pair runs made on the same data, --sample and --valid-pct")
        pa, pb = pa.loc[files], pb.loc[files]
        ca, cb = (pa.label == pa.predicted).to_numpy(), (pb.label == pb.predicted).to_numpy()
        diffs.append(pd.Series(cb.astype(float) - ca.astype(float), index=files))
        per_seed.append({"seed": seed, "run_a": a.name, "run_b": b.name, "accuracy_a": float(ca.mean()),
                         "accuracy_b": float(cb.mean()), **mcnemar_test(ca, cb)})
        prob_cols = [c for c in pa.columns if c.startswith("prob_")]
        if len(prob_cols) == 2:  # binary: AUROC of the second class's probability (the same value for the first)
            positive = (pa.label.astype(str) == prob_cols[1][len("prob_"):]).to_numpy()
            auroc_sets.append((positive, pa[prob_cols[1]].to_numpy(float), pb[prob_cols[1]].to_numpy(float)))
    same_images = all(d.index.equals(diffs[0].index) for d in diffs)
    if same_images:  # the same images under every seed: resample images jointly, each carrying its mean over seeds
        per_image = np.mean([d.to_numpy() for d in diffs], axis=0)
        samples, statistic = [per_image], np.mean
    else:  # each seed drew its own images (--sample, or a split by seed): resample within each seed's images
        samples, statistic = [d.to_numpy() for d in diffs], lambda *ds: float(np.mean([np.mean(d) for d in ds]))
    diff = float(statistic(*samples))
    low, high = bootstrap_ci(samples, statistic, n_resamples=n_resamples)
    out = {"split": split, "seeds": len(pairs), "images": [len(d) for d in diffs], "same_images_across_seeds": same_images,
           "accuracy_a": float(np.mean([p["accuracy_a"] for p in per_seed])),
           "accuracy_b": float(np.mean([p["accuracy_b"] for p in per_seed])),
           "accuracy_diff": diff, "accuracy_diff_ci95": [low, high], "per_seed": per_seed}
    if names: out["names"] = [str(n) for n in names]
    if auroc_sets and all(pos.any() and (~pos).any() for pos, _, _ in auroc_sets):
        # Positives and negatives are resampled apart (stratified), so that every resample has an AUROC.
        def auroc_diff(*idx):  # idx: the positives' then the negatives' image indices of each seed pair, in turn
            return float(np.mean([_auroc(pos[i], sb[i]) - _auroc(pos[i], sa[i]) for (pos, sa, sb), i in
                                  zip(auroc_sets, (np.r_[p, n].astype(int) for p, n in zip(idx[::2], idx[1::2])))]))
        idx = [part for pos, _, _ in auroc_sets for part in (np.flatnonzero(pos), np.flatnonzero(~pos))]
        out["auroc_a"] = float(np.mean([_auroc(pos, sa) for pos, sa, _ in auroc_sets]))
        out["auroc_b"] = float(np.mean([_auroc(pos, sb) for pos, _, sb in auroc_sets]))
        out["auroc_diff"] = auroc_diff(*idx)
        out["auroc_diff_ci95"] = list(bootstrap_ci(idx, auroc_diff, n_resamples=min(n_resamples, 1000)))
    return out


def paired_by_option(
    runs,  # finished run folders
    option: str | None = None,  # compare configurations that differ in this option only; None: in any one option
    split: str = "valid",
    n_resamples: int = 5000,
) -> list:
    "`paired_comparison` of every two configurations among `runs` that differ in exactly one option: a list of dicts."
    groups = seed_groups(runs)
    out = []
    for i, (opts_a, runs_a) in enumerate(groups):
        for opts_b, runs_b in groups[i + 1:]:
            diff = [k for k in set(opts_a) | set(opts_b) if _key({k: opts_a.get(k)}) != _key({k: opts_b.get(k)})]
            if len(diff) != 1 or (option is not None and diff[0] != option):
                continue
            key = diff[0]
            rest = {k: v for k, v in opts_a.items() if k != key and k in differing_options(groups)}
            comparison = paired_comparison(runs_a, runs_b, split=split, n_resamples=n_resamples)
            out.append({"option": key, "a": opts_a.get(key), "b": opts_b.get(key), "fixed": rest, **comparison})
    if option is not None and not out:
        varied = differing_options(groups)
        raise UserError(f"no two configurations differ only in {option!r}; options that vary here: "
                        f"{', '.join(varied) or 'none'}")
    return out


def format_paired(c: dict) -> str:
    "A few lines that say what a comparison from `paired_comparison` or `paired_by_option` found."
    first = c["per_seed"][0]
    if "names" in c: name_a, name_b = c["names"]
    else:
        name_a = f"{c['option']}={c['a']}" if "option" in c else first["run_a"] + ("..." if c["seeds"] > 1 else "")
        name_b = f"{c['option']}={c['b']}" if "option" in c else first["run_b"] + ("..." if c["seeds"] > 1 else "")
    fixed = ", ".join(f"{k}={v}" for k, v in c.get("fixed", {}).items())
    lo, hi = c["accuracy_diff_ci95"]
    n = c["images"][0] if len(set(c["images"])) == 1 else f"{min(c['images'])}-{max(c['images'])}"
    lines = [f"{name_b} vs {name_a}" + (f" ({fixed})" if fixed else "") + f", {c['split']}, {n} images x {c['seeds']} seed(s):",
             f"  accuracy {c['accuracy_b']:.3f} vs {c['accuracy_a']:.3f}: difference {c['accuracy_diff']:+.3f} "
             f"(paired bootstrap 95% CI {lo:+.3f} to {hi:+.3f})"]
    if "auroc_diff" in c:
        lo, hi = c["auroc_diff_ci95"]
        lines.append(f"  AUROC {c['auroc_b']:.3f} vs {c['auroc_a']:.3f}: difference {c['auroc_diff']:+.3f} "
                     f"(95% CI {lo:+.3f} to {hi:+.3f})")
    tests = "; ".join(f"seed {p['seed']}: {p['only_b']} right only with {name_b}, {p['only_a']} only with {name_a}, "
                      f"p={p['pvalue']:.3g}{' (exact)' if p['exact'] else ''}" for p in c["per_seed"])
    lines.append(f"  McNemar per seed pair: {tests}")
    return "\n".join(lines)


def run_probabilities(
    runs,  # run folders scored on the same images (e.g. one configuration under several seeds)
    split: str = "valid",
) -> tuple:
    "`(labels, classes, probs)`: the images' labels (a Series by the first run's file paths), the classes, and one files x classes array per run."
    tables = [_predictions(r, split) for r in map(Path, runs)]
    files = tables[0].index
    for run, t in zip(runs[1:], tables[1:]):
        if not t.index.sort_values().equals(files.sort_values()):
            raise UserError(f"{run} scored other {split} images than {runs[0]}; use runs made on the same data")
    cols = [c for c in tables[0].columns if c.startswith("prob_")]
    labels = pd.Series(tables[0].label.astype(str).to_numpy(), index=tables[0].path.to_numpy(), name="label")
    return labels, [c[len("prob_"):] for c in cols], [t.loc[files, cols].to_numpy(float) for t in tables]


def ensemble_accuracy(runs, split: str = "valid") -> float:
    "Accuracy of the runs' mean class probabilities on `split`: what `predict --ensemble` of their models scores there."
    labels, classes, probs = run_probabilities(runs, split)
    return float((np.asarray(classes)[np.mean(probs, axis=0).argmax(1)] == labels.to_numpy()).mean())


def _heat_map_sources(runs: list):
    """`(members' Learners, the data's table by file, None)` for scoring the ensemble's heat maps, read once for every
    split; `(None, None, why not)` where the run's data or its boxes are not there."""
    from .data import load_table
    from .model_io import load_any, read_description
    input_keys = ("size", "stats", "preprocess")
    metas = [read_description(r)[1] for r in runs]
    if any({k: m.get(k) for k in input_keys} != {k: metas[0].get(k) for k in input_keys} for m in metas):
        raise UserError("the ensemble's heat map averages its members' maps of one input: their size, normalisation and "
                        "preprocessing must be the same")
    config = _read_json(runs[0] / "config.json")
    options, data = config.get("options", {}), config.get("data", {}).get("path")
    if not data or not Path(data).exists():
        return None, None, f"the run's data ({data or 'the demo'}) is not there to read the boxes from"
    split_seed = options.get("split_seed") if options.get("split_seed") is not None else options.get("seed", 42)
    table = load_table(data, valid_pct=options.get("valid_pct", 0.2), seed=split_seed).df.set_index("file")
    if "polygons" not in table.columns: return None, None, f"{data} has no fracture boxes or polygons"
    return [load_any(r) for r in runs], table, None


def _ensemble_localisation(runs: list, learns: list, table: pd.DataFrame, labels: pd.Series, positives, called,
                           positive: str) -> dict:
    """The pointing game and mass inside of the ensemble's heat map (its members' Grad-CAMs averaged) against the
    fracture boxes, on all positives and on the true positives, as a run scores its own (`localisation[_tp]`)."""
    from .cam import score_positives
    from .model_io import read_heat_map
    makes = [read_heat_map(r) for r in runs]  # each member's map made as its run made it, as its probabilities were
    items = table.reindex(labels.index).rename_axis("file").reset_index()
    items["polygons"] = [p if isinstance(p, (list, tuple, np.ndarray)) else [] for p in items.polygons]
    dl = learns[0].dls.test_dl(list(items.file))
    scores = score_positives(learns, dl, positive, positives, called, items=items,
                             levels=[m["levels"] for m in makes], flip=[m["flip"] for m in makes])
    return {key: {**s, "maps": "the members' Grad-CAMs averaged"} for key, s in scores.items()}


def ensemble_binary(
    runs,  # finished two-class runs scored on the same valid and test images (e.g. seeds under one --split-seed)
    operating_point: str | None = None,  # how the threshold is chosen on valid; None: the first run's own rule
    localisation: bool = False,  # also score the ensemble's heat map against the fracture boxes (loads the models)
) -> dict:
    """The metrics of a binary test for the runs' mean class probabilities (what `predict --ensemble` of their models
    outputs): the threshold chosen on the validation split, as a run chooses its own, then applied to the test split.
    With `localisation`, each split also gets the pointing game of the members' averaged Grad-CAMs."""
    from .binary import evaluate_binary
    runs = [Path(r) for r in runs]
    if len(runs) < 2: raise UserError(f"an ensemble needs at least two runs; got {len(runs)}")
    options = run_options(runs[0])
    operating_point = operating_point or options.get("operating_point") or "youden"
    out = {"runs": [str(r) for r in runs], "members": {}, "operating_point": operating_point}
    threshold, (learns, table, not_scored) = None, _heat_map_sources(runs) if localisation else (None, None, None)
    for split in ("valid", "test"):
        try:
            labels, classes, probs = run_probabilities(runs, split)
        except UserError:
            if split == "valid": raise
            break  # runs without a test split: the validation numbers only
        if len(classes) != 2:
            raise UserError(f"ensemble_binary scores two-class runs; {runs[0]} has {len(classes)} classes")
        targets = np.array([classes.index(c) if c in classes else -1 for c in labels.astype(str)])
        mean = np.mean(probs, axis=0)
        scores = evaluate_binary(targets, mean, classes, options.get("positive"), threshold, operating_point)
        threshold = scores["threshold"]
        out[split] = scores
        if not_scored:
            out[split]["localisation_skipped"] = not_scored
        elif localisation:
            pos = classes.index(scores["positive"])
            out[split].update(_ensemble_localisation(runs, learns, table, labels, targets == pos,
                                                     mean[:, pos] >= threshold, scores["positive"]))
        for run in runs:  # each member's own numbers beside the ensemble's
            member = _read_json(run / "metrics.json").get(split, {}).get("binary", {})
            out["members"].setdefault(str(run), {})[split] = {k: member.get(k) for k in ("auroc", "sensitivity", "specificity")}
    out["threshold"] = threshold
    return out


def format_ensemble(result: dict) -> str:
    "`ensemble_binary`'s result as text: the ensemble's AUROC [CI] and operating point per split, each member's beside it."
    def ci(v, c): return "n/a" if v is None else f"{v:.3f}" + (f" [{c[0]:.3f}-{c[1]:.3f}]" if c else "")
    lines = [f"Ensemble of {len(result['runs'])} runs (their mean probabilities); threshold {result['threshold']:.3f} "
             f"chosen on valid for {result['operating_point']}:"]
    for split in ("valid", "test"):
        if split not in result: continue
        b = result[split]
        members = ", ".join("n/a" if m.get(split, {}).get("auroc") is None else f"{m[split]['auroc']:.3f}"
                            for m in result["members"].values())
        lines.append(f"  {split} ({b['n']} images, {b['n_positive']} {b['positive']}): AUROC {ci(b['auroc'], b['auroc_ci95'])} "
                     f"(members: {members}); sensitivity {ci(b['sensitivity'], b['sensitivity_ci95'])} at specificity "
                     f"{ci(b['specificity'], b['specificity_ci95'])}")
        for key in ("localisation_tp", "localisation"):
            if key in b:
                loc = b[key]
                lines.append(f"    pointing game of the averaged heat maps, {loc['images']}: "
                             f"{ci(loc['pointing_game'], loc.get('pointing_game_ci95'))} (n={loc['n']})")
        if "localisation_skipped" in b: lines.append(f"    heat maps not scored: {b['localisation_skipped']}")
    return "\n".join(lines)


def suspect_labels(
    runs,  # run folders scored on the same images: several seeds (or folds) of one configuration
    split: str = "valid",
    max_label_prob: float = 0.1,  # at most this mean probability for the given label
) -> pd.DataFrame:
    """Likely mislabels for a person to review: images that every run calls another class than their label, with a
    mean probability of the label of at most `max_label_prob`. Most confident disagreement first; nothing is dropped."""
    labels, classes, probs = run_probabilities(runs, split)
    mean = np.mean(probs, axis=0)
    col = {c: i for i, c in enumerate(classes)}
    label_idx = np.array([col.get(lab, -1) for lab in labels])
    p_label = np.where(label_idx >= 0, mean[np.arange(len(mean)), label_idx.clip(0)], 0.0)
    every_run_disagrees = np.all([p.argmax(1) != label_idx for p in probs], axis=0)
    rows = every_run_disagrees & (p_label <= max_label_prob)
    out = pd.DataFrame({"file": labels.index[rows], "label": labels.to_numpy()[rows],
                        "called": np.asarray(classes)[mean[rows].argmax(1)], "p_label": p_label[rows],
                        "p_called": mean[rows].max(1), "runs": len(probs)})
    return out.sort_values("p_label", kind="stable").reset_index(drop=True)
