"""Where the seconds of an experiment go, on the real export: the DataLoader alone, the model alone, a real training
epoch, predict end to end against a plain forward, the model on onnxruntime, and every phase of a default run.
Prints measured values and their ratios to the targets (overhead <= 0.10, predict_ratio <= 1.2); asserts nothing.

    python benchmarks/bench_speed.py [--quick] [--json] [--arch tf_efficientnet_lite0] [-- extra run options]

`--quick` measures the same keys on a small sample (under 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a model hub

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bone-fracture-yolo8"
TARGETS = {"overhead": 0.10, "predict_ratio": 1.2}


def _dls(args, table, cache):
    from fracture_fastai.data import radiograph_dataloaders
    from fracture_fastai.models import arch_stats
    return radiograph_dataloaders(table, size=args.size, bs=args.bs, seed=42, stats=arch_stats(args.arch),
                                  copies=args.copies, cache=cache, num_workers=args.num_workers)


def _epoch_seconds(dl) -> tuple:
    "(seconds, images) of one pass over `dl`, batch transforms included, no model."
    start, n = time.perf_counter(), 0
    for xb, yb in dl:
        n += len(xb)
    return time.perf_counter() - start, n


def measure_pipeline(args, table) -> dict:
    "Training DataLoader alone: reading, preprocessing, augmentation, collation; cold cache, warm cache, no cache."
    from fracture_fastai.cache import PreprocessCache
    cache = PreprocessCache(tempfile.mkdtemp(prefix="bench-cache-"))
    cold_s, n = _epoch_seconds(_dls(args, table, cache).train)
    warm_s, _ = _epoch_seconds(_dls(args, table, cache).train)
    none_s, _ = _epoch_seconds(_dls(args, table, False).train)
    cache.clear()
    return {"pipeline_img_s": n / warm_s, "pipeline_cold_img_s": n / cold_s, "pipeline_uncached_img_s": n / none_s}


def _learner(args, dls):
    from fracture_fastai.train import radiograph_learner
    learn = radiograph_learner(args.arch, dls, precision=args.precision, path=tempfile.mkdtemp(prefix="bench-"))
    learn.unfreeze()  # the main phase's cost: the whole model learns
    if args.freeze_stride:  # ... but its high-resolution front (run --freeze-stride): as FreezeEarly leaves it in a fit
        from fracture_fastai.train import FreezeEarly
        keep = FreezeEarly(args.freeze_stride)
        learn.add_cb(keep)
        keep.before_fit()  # measure_model steps the optimiser itself, outside any fit
    return learn


def measure_model(learn, n_batches: int) -> float:
    "Images/s of forward + backward + optimiser step on random tensors of the training batch's shape, as `learn` trains."
    import torch
    from fastai.callback.channelslast import ChannelsLast
    from fracture_fastai.train import CPUBFloat16
    xb, yb = learn.dls.one_batch()
    # Plain tensors: fastai's TensorImage would send every op of the network through its __torch_function__
    # (measured ~25 % slower), which is not the model's own cost.
    x, y = torch.randn(xb.shape), torch.randint(0, learn.dls.c, yb.shape)
    model, loss_func = learn.model, learn.loss_func
    if any(isinstance(cb, ChannelsLast) for cb in learn.cbs): model.to(memory_format=torch.channels_last)
    bf16 = any(isinstance(cb, CPUBFloat16) for cb in learn.cbs)
    learn.create_opt()
    model.train()
    times = []
    for i in range(n_batches + 1):  # the first batch warms up (allocations, kernel selection)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(x)
        loss = loss_func(pred.float(), y)
        loss.backward()
        learn.opt.step()
        learn.opt.zero_grad()
        if i: times.append(time.perf_counter() - start)
    return len(x) * len(times) / sum(times)


def measure_train(learn) -> tuple:
    "(images/s, seconds) of the training half of a real `fit` epoch: data, transforms, callbacks, model, optimiser."
    from fastai.callback.core import Callback

    class _Clock(Callback):
        def before_train(self): self.start = time.perf_counter()
        def after_train(self): self.seconds = time.perf_counter() - self.start

    clock, seconds = _Clock(), []
    with learn.no_bar(), learn.no_logging():
        for _ in range(2):  # the faster of two epochs, as the model alone is timed after a warm-up
            learn.fit(1, 1e-4, cbs=clock)
            seconds.append(clock.seconds)
    n = len(learn.dls.train) * learn.dls.train.bs
    return n / min(seconds), min(seconds)


def _timed_cli(*cmd) -> float:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
    if res.returncode: sys.exit(f"{' '.join(cmd[:2])} failed: {res.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def _predict_cli(model, files, bs: int, *options) -> tuple:
    """`(images/s, seconds of a one-image run)` of `python -m fracture_fastai.predict MODEL FILES OPTIONS`: throughput
    from the difference of two whole runs (`bs` and all `files` images), the fastest of three each."""
    folder = Path(tempfile.mkdtemp(prefix="bench-predict-csv-"))
    def cli(n): return _timed_cli("fracture_fastai.predict", str(model), *map(str, files[:n]), *options,
                                  "--csv", str(folder / f"{n}.csv"), "--bs", str(bs))
    one = cli(1)
    # A process's wall time varies by a few tenths of a second from run to run, hence the fastest of three.
    batch, full = min(cli(bs) for _ in range(3)), min(cli(len(files)) for _ in range(3))
    # Process start, loading the model and the first batch's one-off costs (kernel selection for that shape)
    # cancel out in the difference; they are reported as the one-image run.
    return (len(files) - bs) / max(full - batch, 1e-9), one


def measure_predict(learn, files, bs: int = 16) -> dict:
    "`python -m fracture_fastai.predict` on 1, `bs` and all `files`, against a plain forward of the model predict loads."
    import torch
    from fracture_fastai.predict import load_export
    from fracture_fastai.train import export_learner
    folder = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    export = export_learner(learn, folder / "export.pkl")
    predict_img_s, one = _predict_cli(export, files, bs)
    # The model as predict loads it (load_export), the same images already as plain tensors, a no_grad forward.
    from fracture_fastai.evaluate import _input_batches, _without_identity_warps
    from fracture_fastai.models import fold_batchnorm
    exported = load_export(export)
    dl = _without_identity_warps(exported.dls.test_dl([str(f) for f in files], bs=bs))
    start = time.perf_counter()
    batches = [b[0].as_subclass(torch.Tensor) for b in _input_batches(dl)]  # predict's own way of making them
    input_ms = (time.perf_counter() - start) / len(files) * 1e3
    model = exported.model.eval()
    raw_img_s = _forward_img_s(model, batches)
    # What predict runs in its place: the same function, its batch norms folded into the convolutions.
    folded_img_s = _forward_img_s(fold_batchnorm(model, batches[0][:1])[0], batches)
    return {"predict_img_s": predict_img_s, "predict_process_start_s": one, "predict_images": len(files),
            "raw_forward_img_s": raw_img_s, "predict_ratio": raw_img_s / predict_img_s,
            "predict_forward_img_s": folded_img_s, "predict_input_ms": input_ms}


def _forward_img_s(model, batches) -> float:
    "Images/s of a plain no_grad forward of `model` over `batches` (after one warm-up batch), the faster of two passes."
    import torch
    with torch.no_grad():
        model(batches[0])
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            for xb in batches: model(xb)
            seconds.append(time.perf_counter() - start)
    return sum(len(xb) for xb in batches) / min(seconds)


def measure_onnx(learn, files, bs: int = 16) -> dict:
    """Images/s of the model as model.onnx on onnxruntime's CPU provider, the same threads and batches as the raw
    forward (`onnx_img_s`), and of `predict --backend onnx` end to end, measured as `predict_img_s` is."""
    import torch
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}  # the [onnx] extra is not installed: nothing to measure
    from fracture_fastai.model_io import export_onnx, load_onnx, save_model
    folder = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    save_model(learn, folder)
    export_onnx(folder)
    model = load_onnx(folder, threads=torch.get_num_threads())
    # The batches as predict --backend onnx makes them (numpy/OpenCV), timed apart from the model as raw_forward is.
    batches = [model.inputs(files[i:i + bs]) for i in range(0, len(files), bs)]
    model.run(batches[0])  # warm-up
    start = time.perf_counter()
    for xb in batches: model.run(xb)
    onnx_img_s = len(files) / (time.perf_counter() - start)
    return {"onnx_img_s": onnx_img_s, "predict_onnx_img_s": _predict_cli(folder, files, bs, "--backend", "onnx")[0]}


def measure_phases(args, extra) -> dict:
    "A whole run with the command line's defaults (`--quick`: a sample), its phases from config.json."
    out = (Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-run-"))) / "run"
    cmd = ["fracture_fastai.run", "--arch", args.arch, "--data", str(args.data), "--out", str(out)]
    cmd += ["--sample", "15", "--epochs", "1"] if args.quick else []
    seconds = _timed_cli(*cmd, *extra)
    config = json.loads((out / "config.json").read_text())
    valid = json.loads((out / "metrics.json").read_text())["valid"]
    return {"run_minutes": seconds / 60, **({"run_folder": str(out)} if args.keep else {}), "phases": config["phases"],
            "run_images_per_epoch": config["data"]["images_per_epoch"], "valid_accuracy": valid["accuracy"],
            "valid_accuracy_ci95": valid["accuracy_ci95"], "valid_n": valid["n"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=None, help="default: the run's (fracture_fastai.run.SIZE)")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--precision", default="auto")
    p.add_argument("--copies", default="one")
    p.add_argument("--freeze-stride", type=int, default=0,
                   help="keep the layers at 1/N of the input's side or finer at their weights, as run --freeze-stride N")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a small sample: the same keys in under 3 minutes")
    p.add_argument("--no-run", action="store_true", help="skip the whole default run (phases)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="leave the whole run (phases) in DIR/run; by default every folder made is removed at the end")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.keep and (Path(args.keep) / "run").exists():
        sys.exit(f"--keep {args.keep}: {Path(args.keep) / 'run'} exists already; give another folder")
    # The caches, models and predictions made below go in one scratch folder, removed at the end, so repeated
    # benchmarks leave nothing behind (the run's folder, where --keep asks for it, is made outside it).
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        tempfile.tempdir = scratch
        try:
            _measure(args, extra)
        finally:
            tempfile.tempdir = None


def _measure(args, extra):
    args.data = Path(args.data)
    if args.size is None:
        from fracture_fastai.run import SIZE
        args.size = SIZE
    if not (args.data / "data.yaml").exists():
        print(f"skipped: real data absent ({args.data} not found; it sits beside the project as ../shared/data)")
        return
    import torch
    from fracture_fastai.data import load_table, sample_per_class
    from fracture_fastai.cache import PreprocessCache
    from fracture_fastai.runtime import tune_malloc
    # The allocator and collector as the command lines set them (fracture_fastai/runtime.py): the model alone and
    # the plain forward are measured under the same process settings as the run and predict they are compared with.
    malloc_tuned = tune_malloc()

    table = load_table(args.data)
    if args.quick: table.df = sample_per_class(table.df, 40, seed=42)
    res = {"arch": args.arch, "size": args.size, "bs": args.bs, "freeze_stride": args.freeze_stride, "quick": args.quick, "threads": torch.get_num_threads(),
           "malloc_tuned": malloc_tuned}
    res.update(measure_pipeline(args, table))
    cache = PreprocessCache(tempfile.mkdtemp(prefix="bench-cache-"))
    dls = _dls(args, table, cache)
    _epoch_seconds(dls.train); _epoch_seconds(dls.valid)  # fill the cache: the steady state is what a run sees after its first epoch
    learn = _learner(args, dls)
    import gc
    gc.freeze()  # what run and predict do once everything is loaded (runtime.frozen_gc)
    from fracture_fastai.train import precision_of
    res["precision"] = precision_of(learn)
    res["model_img_s"] = measure_model(learn, 4 if args.quick else 12)
    res["train_img_s"], res["train_epoch_s"] = measure_train(learn)
    res["overhead"] = res["model_img_s"] / res["train_img_s"] - 1  # time(train) / time(model alone) - 1
    # Validation images first, then training images: enough that the throughput is not lost in the noise of two
    # process wall times (about +-0.2 s; 512 images take 4 s).
    files = list(dict.fromkeys([*dls.valid.items.file, *table.df.file]))[:100 if args.quick else 512]
    res.update(measure_predict(learn, files))
    res.update(measure_onnx(learn, files))
    cache.clear()
    if not args.no_run: res.update(measure_phases(args, extra))
    res["targets"] = {k: {"target": t, "measured": res[k], "ratio": res[k] / t, "met": res[k] <= t} for k, t in TARGETS.items()}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    rows = [("pipeline_img_s (warm cache)", res["pipeline_img_s"]), ("pipeline_cold_img_s", res["pipeline_cold_img_s"]),
            ("pipeline_uncached_img_s", res["pipeline_uncached_img_s"]), ("model_img_s", res["model_img_s"]),
            ("train_img_s", res["train_img_s"]), ("overhead", res["overhead"]), ("predict_img_s", res["predict_img_s"]),
            ("predict_process_start_s", res["predict_process_start_s"]), ("raw_forward_img_s", res["raw_forward_img_s"]),
            ("predict_ratio", res["predict_ratio"]), ("predict_forward_img_s (batch norms folded)", res["predict_forward_img_s"]),
            ("predict_input_ms (reading + preprocessing, per image)", res["predict_input_ms"])] + [("onnx_img_s (onnxruntime CPU)", res["onnx_img_s"]),
            ("predict_onnx_img_s (--backend onnx)", res["predict_onnx_img_s"])] * ("onnx_img_s" in res)
    print(f"{args.arch}, {args.size} px, bs {args.bs}, precision {res['precision']}, {res['threads']} threads")
    for name, value in rows:
        target = TARGETS.get(name)
        tail = f"   target <= {target}: ratio {value / target:.2f} ({'met' if value <= target else 'NOT met'})" if target else ""
        print(f"{name:54s} {value:10.2f}{tail}")
    if "phases" in res:
        print(f"\nrun: {res['run_minutes']:.2f} min, valid accuracy {res['valid_accuracy']:.3f} "
              f"(95% CI {res['valid_accuracy_ci95'][0]:.3f}-{res['valid_accuracy_ci95'][1]:.3f}, n={res['valid_n']})")
        for name, sec in res["phases"].items():
            print(f"  {name:14s} {sec if isinstance(sec, (int, float)) else sec}")


if __name__ == "__main__":
    main()
