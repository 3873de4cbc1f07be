"""`python -m fracture_fastai.dataset PATH [--json]`: what the package makes of a dataset, split by split."""
from __future__ import annotations

import json

from .data import load_table
from .errors import ArgumentParser, cli_errors

__all__ = ["main", "format_summary"]


def format_summary(table) -> str:
    "Per-split, per-class counts and what was left out, as a small text table."
    counts = table.counts()
    classes = table.classes
    width = max([len(c) for c in classes] + [8])
    lines = [f"source: {table.source}", f"{'class':<{width}}" + "".join(f"{s:>8}" for s in counts)]
    for cls in classes:
        lines.append(f"{cls:<{width}}" + "".join(f"{counts[s].get(cls, 0):>8}" for s in counts))
    lines.append(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>8}" for s in counts))
    lines += _body_part_lines(table, list(counts))
    for reason, n in sorted(table.skipped.items()):
        lines.append(f"left out: {n} {reason}")
    lines += [f"note: {n}" for n in table.notes]
    return "\n".join(lines)


def _body_part_lines(table, splits) -> list:
    "Counts by body part and class, split by split, where the source tags body parts (FracAtlas)."
    by_part = table.counts_by("body_part")
    if not by_part: return []
    rows = sorted({(part, cls) for split in by_part.values() for part, classes in split.items() for cls in classes})
    width = max(len(f"{part} {cls}") for part, cls in rows) + 2
    lines = ["", f"{'body part, class':<{width}}" + "".join(f"{s:>8}" for s in splits)]
    for part, cls in rows:
        lines.append(f"{part + ' ' + cls:<{width}}" + "".join(f"{by_part.get(s, {}).get(part, {}).get(cls, 0):>8}" for s in splits))
    return lines


@cli_errors
def main(argv=None):
    parser = ArgumentParser(prog="python -m fracture_fastai.dataset", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("path", help="a YOLO export (folder with data.yaml), a folder tree of classes, a CSV (file,label[,split]) or a FracAtlas folder")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"splits": {split: {class: n}}, "skipped": {reason: n}}, and where the data tags body '
                        'parts "body_parts": {split: {part: {class: n}}}')
    parser.add_argument("--valid-pct", type=float, default=0.2, help="share of train's radiographs held out when the data has no validation split")
    parser.add_argument("--seed", type=int, default=42, help="seed of that split")
    args = parser.parse_args(argv)
    table = load_table(args.path, valid_pct=args.valid_pct, seed=args.seed)
    print(json.dumps(table.summary()) if args.json else format_summary(table))


if __name__ == "__main__":
    main()
