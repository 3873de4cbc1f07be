"""Pseudo-labels: the train split's unlabelled radiographs (a YOLO export's empty label files), labelled by a teacher
model where it is confident, as extra training images for a student (`run --pseudo-labels TEACHER`).

The teacher's class probabilities are averaged over each source radiograph's copies (Roboflow's `.rf.` group) and a
whole group is kept or left out, with one label: copies of one radiograph never disagree, and none of a group that
also sits in the validation or test split is used, so those stay clean.
"""
from __future__ import annotations

import sys

import pandas as pd

from .errors import UserError

__all__ = ["THRESHOLD", "pseudo_label", "add_pseudo_labels"]

THRESHOLD = 0.9  # the teacher's mean probability of its class over a group's copies, from which the group is kept


def pseudo_label(
    table,  # a `DataTable` with unlabelled images (`table.unlabelled`)
    teachers,  # models of the table's classes (run folders, model.json or export.pkl); several: their mean probabilities
    threshold: float = THRESHOLD,  # keep a group where the teacher's probability of its class reaches this
    bs: int = 32,  # the teacher's batch size
) -> tuple:
    """`(rows, summary)`: table rows (file, label, split 'train', group, no polygons, pseudo True) of the unlabelled
    train radiographs the teachers call with probability >= `threshold`, and what was kept, by class."""
    import numpy as np
    from .model_io import load_any
    from .predict import average_tables, predict_files
    candidates = _candidates(table)
    learners = [load_any(t) for t in teachers]
    classes = [str(c) for c in learners[0].dls.vocab]
    for t, learn in zip(teachers, learners):
        vocab = [str(c) for c in learn.dls.vocab]
        if vocab != table.classes:
            raise UserError(f"--pseudo-labels {t}: the teacher predicts {', '.join(vocab)} but the data's classes are "
                            f"{', '.join(table.classes)}; use a model trained on this data's classes")
    tables = []
    for learn in learners:
        predicted, _ = predict_files(learn, list(candidates.file), bs=bs)  # unreadable ones are left out
        tables.append(predicted)
    files, probs = average_tables(tables, classes)
    unread = len(candidates) - len(files)
    scored = pd.DataFrame(probs, columns=classes).assign(file=files)
    scored = scored.merge(candidates[["file", "group"]], on="file")
    by_group = scored.groupby("group", sort=True)[classes].mean()
    best = by_group.to_numpy().argmax(axis=1)
    confidence = by_group.to_numpy().max(axis=1)
    label = pd.Series(np.asarray(classes)[best], index=by_group.index)
    kept = label[confidence >= threshold]
    rows = scored[scored.group.isin(kept.index)][["file", "group"]].copy()
    rows["label"] = rows.group.map(kept)
    rows = rows.assign(split="train", polygons=[[] for _ in range(len(rows))], pseudo=True)
    summary = {"teachers": [str(t) for t in teachers], "threshold": threshold, "images": len(candidates),
               "unreadable": unread, "groups": len(by_group), "kept_groups": len(kept), "kept_images": len(rows),
               "share_kept": round(len(kept) / len(by_group), 4) if len(by_group) else 0.0,
               "kept_by_class": {c: int((kept == c).sum()) for c in classes}}
    return rows[["file", "label", "split", "group", "polygons", "pseudo"]].reset_index(drop=True), summary


def _candidates(table) -> pd.DataFrame:
    "The train split's unlabelled images whose group has no image in another split; a `UserError` if there are none."
    unlabelled = table.unlabelled
    held_out = set(table.df.group[table.df.split != "train"])
    candidates = unlabelled[(unlabelled.split == "train") & ~unlabelled.group.isin(held_out)]
    if candidates.empty:
        raise UserError("--pseudo-labels: the data holds no unlabelled train images (a YOLO export's images with "
                        "empty label files) to label; leave the option out for this data")
    return candidates.reset_index(drop=True)


def add_pseudo_labels(
    table,  # a `DataTable`; its df gains the pseudo-labelled rows (column `pseudo` True; False for the others)
    teachers,  # as for `pseudo_label`
    threshold: float = THRESHOLD,
    bs: int = 32,
) -> dict:
    "Label the unlabelled train radiographs with `pseudo_label` and add those kept to `table.df`; the summary."
    rows, summary = pseudo_label(table, teachers, threshold, bs)
    if rows.empty:
        raise UserError(f"--pseudo-labels: the teacher reaches {threshold} on none of the {summary['groups']} "
                        "unlabelled train radiographs; pass a lower --pseudo-threshold")
    table.df = pd.concat([table.df.assign(pseudo=False), rows], ignore_index=True)
    print(f"pseudo-labels: {summary['kept_groups']} of {summary['groups']} unlabelled train radiographs "
          f"({summary['kept_images']} images) called with probability >= {threshold}: "
          + ", ".join(f"{c} {n}" for c, n in summary["kept_by_class"].items()), file=sys.stderr, flush=True)
    return summary
