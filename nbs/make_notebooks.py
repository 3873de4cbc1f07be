"""Writes the notebooks of nbs/ from the cells below, without outputs. Edit here, run `python nbs/make_notebooks.py`."""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent

SETUP = '''import os
from pathlib import Path

# The test suite runs every notebook top to bottom with FRACTURE_FASTAI_SMOKE=1: tiny samples, one epoch.
SMOKE = os.environ.get("FRACTURE_FASTAI_SMOKE") == "1"
SHARED = Path("../../shared/data/bone-fracture-yolo8")  # the seed's Kaggle export, read in place
DATA = SHARED if SHARED.exists() else None               # None: the package's synthetic demo
RUNS = Path(os.environ.get("FRACTURE_FASTAI_RUNS", "runs"))  # where this notebook's runs go
print("data:", DATA or "built-in synthetic demo", "| smoke run" if SMOKE else "")'''

NOTEBOOKS = {
    "00_data.ipynb": [
        ("md", "# 00 · The data\nWhat `fracture_fastai` makes of the dataset: classes per split, what was left out, "
               "a sample of radiographs, and CLAHE before and after."),
        ("code", SETUP),
        ("code", '''from fracture_fastai.data import load_table, sample_per_class
from fracture_fastai.dataset import format_summary
from fracture_fastai.demo import make_demo

table = load_table(DATA or make_demo())
print(format_summary(table))'''),
        ("md", "## Class balance\nTrain holds Roboflow's augmented copies (about three per radiograph); the groups column counts "
               "source radiographs."),
        ("code", '''import matplotlib.pyplot as plt
counts = table.df.groupby(["label", "split"]).size().unstack(fill_value=0)
groups = table.df.groupby(["label", "split"]).group.nunique().unstack(fill_value=0).add_suffix(" radiographs")
display(counts.join(groups))
counts.plot.bar(figsize=(8, 3), title="images per class and split"); plt.show()'''),
        ("md", "## A sample, as the model sees it\nCLAHE + median filter, padded to a square (never cropped), augmented."),
        ("code", '''from fracture_fastai.data import radiograph_dataloaders
small = load_table(DATA or make_demo())
small.df = sample_per_class(small.df, 2 if SMOKE else 16)
dls = radiograph_dataloaders(small, size=64 if SMOKE else 224, bs=4 if SMOKE else 16, device="cpu")
dls.show_batch(max_n=4 if SMOKE else 9, figsize=(8, 8))'''),
        ("md", "## CLAHE before and after\nContrast-limited adaptive histogram equalisation brings out cortical edges "
               "and trabecular texture; the median filter first removes speckle that CLAHE would amplify."),
        ("code", '''import numpy as np
from PIL import Image
from fracture_fastai.transforms import preprocess_radiograph

files = table.df.groupby("label").file.first()
fig, axes = plt.subplots(2, len(files), figsize=(2.2 * len(files), 4.6))
for i, (label, f) in enumerate(files.items()):
    raw = np.asarray(Image.open(f).convert("L"))
    axes[0, i].imshow(raw, cmap="gray"); axes[0, i].set_title(label)
    axes[1, i].imshow(preprocess_radiograph(raw)[..., 0], cmap="gray"); axes[1, i].set_title("CLAHE + median")
for ax in axes.flat: ax.axis("off")
plt.tight_layout(); plt.show()'''),
    ],
    "01_train.ipynb": [
        ("md", "# 01 · One run and how to read it\n`fracture_fastai.run` from Python: the same run folder as the command "
               "line, then its interpretation plots."),
        ("code", SETUP),
        ("code", '''from fracture_fastai.run import parse_args, run

ARCH = "cnn" if SMOKE else "tf_efficientnet_lite0"
argv = ["--arch", ARCH, "--out", str(RUNS / ("nb-01-" + ARCH + ("-smoke" if SMOKE else "")))]
argv += ["--data", str(DATA)] if DATA else []
argv += ["--sample", "2", "--size", "32", "--epochs", "1", "--bs", "4", "--no-tta"] if SMOKE else []
import shutil; shutil.rmtree(argv[3], ignore_errors=True)  # this notebook's own folder only; runs/ keeps the rest
run_dir = run(parse_args(argv))
run_dir'''),
        ("md", "## Metrics\nAccuracy with its 95 % Wilson interval: on a validation set of ~170 images the interval is "
               "about ±5 points wide, so differences smaller than that between runs are noise."),
        ("code", '''import json
import pandas as pd
metrics = json.loads((run_dir / "metrics.json").read_text())
for split in ("valid", "test"):
    if split in metrics:
        m = metrics[split]
        print(f"{split}: accuracy {m['accuracy']:.3f} {m['accuracy_ci95']}, macro-F1 {m['macro_f1']:.3f}, n={m['n']}")
pd.DataFrame(metrics["valid"]["per_class"]).T'''),
        ("md", "## Learning rate, curves, confusion matrix, top losses"),
        ("code", '''from IPython.display import Image as Show, display
for name in ("lr_find.png", "curves.png", "confusion_matrix.png", "top_losses.png", "gradcam.png"):
    if (run_dir / name).exists():
        print(name); display(Show(filename=str(run_dir / name), width=520))'''),
        ("md", "## Predict with the saved model\n`model.json` + `model.safetensors` carry the arch, the preprocessing "
               "and the weights: `load_model` rebuilds the model without unpickling anything (`export.pkl`, fastai's "
               "pickle, is there too, for `load_learner`)."),
        ("code", '''from fracture_fastai import load_model
from fracture_fastai.predict import predict_files
learn = load_model(run_dir)
files = [str(f) for f in sorted((Path(DATA) / "val" / "images").iterdir())[:4]] if DATA else None
if files is None:
    from fracture_fastai.demo import demo_dir
    files = [str(f) for f in sorted((demo_dir() / "valid" / "images").iterdir())[:4]]
preds, failed = predict_files(learn, files)
preds'''),
    ],
    "02_compare.ipynb": [
        ("md", "# 02 · Which architecture wins, and where do they look?\nA leaderboard over run folders (accuracy with "
               "95 % CIs, macro-F1, pointing game against the annotated fractures, size, CPU speed) and a Grad-CAM gallery."),
        ("code", SETUP),
        ("code", '''from fracture_fastai.compare import collect_runs, leaderboard, to_markdown, write_leaderboard
from fracture_fastai.run import parse_args, run

# The seed's comparison: the custom CNN against ResNet-18, extended to any arch with runs in RUNS.
if SMOKE:  # two tiny runs of our own, so the notebook has something to compare
    for arch in ("cnn", "resnet18"):
        out = RUNS / f"nb-02-{arch}-smoke"
        if not (out / "metrics.json").exists():
            argv = ["--arch", arch, "--pretrained", "none", "--sample", "2", "--size", "32", "--epochs", "1",
                    "--bs", "4", "--no-tta", "--out", str(out)] + (["--data", str(DATA)] if DATA else [])
            run(parse_args(argv))
runs = collect_runs([RUNS])
board = leaderboard(runs, n_images=4 if SMOKE else 16)
print(to_markdown(board))'''),
        ("code", '''paths = write_leaderboard(board, RUNS)
from IPython.display import Image as Show, display
display(Show(filename=str(paths[-1]), width=600))'''),
        ("md", "## Grad-CAM gallery\nEach run's most confident right and wrong validation predictions, with the "
               "heat map of the predicted class. The pointing-game column above says how often the map's peak falls on "
               "the annotated fracture."),
        ("code", '''for run_dir in runs:
    if (run_dir / "gradcam.png").exists():
        print(run_dir.name); display(Show(filename=str(run_dir / "gradcam.png"), width=900))'''),
    ],
    "03_fracture.ipynb": [
        ("md", "# 03 · Is there a fracture?\nThe second task on FracAtlas: fractured or normal, scored as a diagnostic "
               "test (AUROC, sensitivity and specificity at a threshold chosen on the validation split, calibration), "
               "and where the model looks on its true and false positives."),
        ("code", '''import os
from pathlib import Path

# The test suite runs every notebook top to bottom with FRACTURE_FASTAI_SMOKE=1: tiny samples, one epoch.
SMOKE = os.environ.get("FRACTURE_FASTAI_SMOKE") == "1"
RUNS = Path(os.environ.get("FRACTURE_FASTAI_RUNS", "runs"))  # where this notebook's runs go
SHARED = Path("../../shared/data/fracatlas")                 # FracAtlas, read in place
DATA = SHARED
if not SHARED.exists():  # a tiny SYNTHETIC set in FracAtlas's layout, so the notebook runs anywhere
    from fracture_fastai.demo import make_fracatlas_demo
    DATA = RUNS / "fracatlas-demo"
    if not (DATA / "dataset.csv").exists():
        make_fracatlas_demo(DATA, n_fractured=12, n_normal=24)
print("data:", DATA if DATA == SHARED else f"SYNTHETIC FracAtlas-shaped demo in {DATA}", "| smoke run" if SMOKE else "")'''),
        ("md", "## The data\nFracAtlas has no official split and no patient ids: the package splits it 70/15/15, seeded, "
               "stratified by label and body part, with byte-identical images kept on one side."),
        ("code", '''from fracture_fastai.data import load_table
from fracture_fastai.dataset import format_summary

table = load_table(DATA)
print(format_summary(table))
table.df.groupby(["body_part", "label"]).size().unstack(fill_value=0)'''),
        ("md", "## One run\nThe same runner as for body regions, with `--recipe fracture` (320 px, oversampling, the "
               "boxes supervising the heat maps, a threshold for 90 % specificity, each image scored with its mirror; a tiny, fast version on the synthetic set): with two classes it adds the binary metrics, "
               "`roc.png`, `pr.png` and `calibration.png`, and saves the threshold, and the mirror TTA it was chosen with, with the model."),
        ("code", '''from fracture_fastai.run import parse_args, run

ARCH = "cnn" if SMOKE else "tf_efficientnet_lite0"
out = RUNS / ("nb-03-" + ARCH + ("-smoke" if SMOKE else ""))
argv = ["--data", str(DATA), "--recipe", "fracture", "--arch", ARCH, "--out", str(out)]  # the README's recipe
argv += ["--sample", "8", "--size", "32", "--epochs", "1", "--bs", "8", "--no-tta"] if SMOKE else []
import shutil; shutil.rmtree(out, ignore_errors=True)  # this notebook's own folder only; runs/ keeps the rest
run_dir = run(parse_args(argv))
run_dir'''),
        ("md", "## The numbers of a diagnostic test\nSensitivity, specificity, PPV and NPV at the threshold chosen on "
               "the validation split (for 90 % specificity here) and applied unchanged to the test split; accuracy "
               "beside what calling every image normal would score."),
        ("code", '''import json
import pandas as pd
metrics = json.loads((run_dir / "metrics.json").read_text())
keys = ["n", "n_positive", "auroc", "auroc_ci95", "average_precision", "threshold", "sensitivity", "sensitivity_ci95",
        "specificity", "specificity_ci95", "ppv", "npv", "accuracy", "baseline_accuracy", "brier", "ece"]
pd.DataFrame({split: {k: metrics[split]["binary"].get(k) for k in keys} for split in ("valid", "test") if split in metrics})'''),
        ("code", '''split = "test" if "test" in metrics else "valid"
for column, groups in metrics[split]["binary"].get("subgroups", {}).items():
    display(pd.DataFrame(groups).T[["n", "n_positive", "auroc", "sensitivity", "specificity"]].rename_axis(column))'''),
        ("md", "## ROC, precision-recall, calibration"),
        ("code", '''from IPython.display import Image as Show, display
for name in ("roc.png", "pr.png", "calibration.png"):
    if (run_dir / name).exists():
        display(Show(filename=str(run_dir / name), width=420))'''),
        ("md", "## Where it looks: true and false positives\nGrad-CAM of `fractured` on the most confident true "
               "positives and false positives of the validation split, called at the threshold saved with the model."),
        ("code", '''import matplotlib.pyplot as plt
from fracture_fastai import load_model
from fracture_fastai.cam import decode_images, gradcam
from fracture_fastai.model_io import read_decision, read_heat_map
from fracture_fastai.predict import predict_files

learn, decision, heat_map = load_model(run_dir), read_decision(run_dir), read_heat_map(run_dir)  # as the run made its maps
valid = table.df[table.df.split == "valid"]
valid = valid.groupby("label").head(32) if SMOKE else valid
preds, _ = predict_files(learn, valid.file.tolist(), decision=decision)
preds["label"] = valid.label.to_numpy()
called = preds[preds["class"] == decision["positive"]]
picks = pd.concat([called[called.label == decision["positive"]].nlargest(4, "probability").assign(kind="true positive"),
                   called[called.label != decision["positive"]].nlargest(4, "probability").assign(kind="false positive")])
if len(picks):
    dl = learn.dls.test_dl(picks.file.tolist())
    x = dl.one_batch()[0]
    cams, images = gradcam(learn, x, target=decision["positive"], **heat_map), decode_images(dl, x)
    fig, axs = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 3), squeeze=False)
    for ax, image, cam, row in zip(axs[0], images, cams, picks.itertuples()):
        ax.imshow(image, cmap="gray"); ax.imshow(cam, cmap="jet", alpha=0.45); ax.axis("off")
        ax.set_title(f"{row.kind}\\np = {row.probability:.2f}", fontsize=8)
    plt.show()
else:
    print("no image of this sample is called", decision["positive"])'''),
    ],
}


def build():
    for name, cells in NOTEBOOKS.items():
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(nb.cells): cell.id = f"{Path(name).stem}-{i}"  # stable ids: a rebuild changes only what changed
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, HERE / name)


if __name__ == "__main__":
    build()
