"""A tracking store for runs (`run --track mlflow`): options, per-epoch metrics while training, final metrics and the
run folder's files go to MLflow; the run folder stays the record, MLflow the index across machines and people.
`--track tensorboard` writes fastai's TensorBoard event files into the run folder instead.

The fastai callback is a training-only one: `run` takes it out before the export, so export.pkl never holds it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .errors import UserError

__all__ = ["TRACKERS", "epoch_metrics", "tracking_callbacks", "finish_tracking"]

TRACKERS = ("none", "mlflow", "tensorboard")
DEFAULT_STORE = "mlruns"  # a local folder of the current directory


def _store(uri: str | None) -> tuple:
    """`(tracking URI, artifact location or None)`: a URL as it is; a folder (default ./mlruns) as a local store in it,
    `mlflow.db` (SQLite: MLflow 3 keeps its plain-file store in maintenance mode) beside `artifacts/`."""
    text = uri or DEFAULT_STORE
    if "://" in text or text.startswith("file:"):
        return text, None
    folder = Path(text).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise UserError("--track mlflow needs MLflow: pip install 'fracture_fastai[track]'") from None
    return mlflow


def _epoch_metrics_class():
    from fastai.callback.core import Callback

    class EpochMetrics(Callback):
        "After each training epoch, `log_epoch(step, {name: value})` with the recorder's losses and metrics."
        order = 70  # after the Recorder has the epoch's values
        def __init__(self, log_epoch):
            self.log_epoch, self.step, self.trained = log_epoch, 0, False
        # get_preds fires before/after_epoch too (evaluation, plots) with no training between; lr_find is no epoch.
        def before_epoch(self): self.trained = False
        def after_train(self): self.trained = not hasattr(self.learn, "lr_finder")
        def after_epoch(self):
            if not self.trained: return
            rec = self.learn.recorder
            names, values = rec.metric_names[1:-1], rec.log[1:len(rec.metric_names) - 1]
            metrics = {n: float(v) for n, v in zip(names, values) if isinstance(v, (int, float)) and math.isfinite(v)}
            step, self.step = self.step, self.step + 1
            self.log_epoch(step, metrics)
    return EpochMetrics


def __getattr__(name):
    # `tracking.EpochMetrics` made on first access, so importing this module needs neither fastai nor MLflow.
    if name == "EpochMetrics": return _epoch_metrics_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def epoch_metrics(
    log_epoch,  # called as log_epoch(step, {metric name: value}) after each training epoch; step counts from 0
):
    "A training-only fastai Callback that hands each epoch's recorder values (losses, metrics) to `log_epoch`."
    return _epoch_metrics_class()(log_epoch)


def _params(options: dict) -> dict:
    "Run options as MLflow params: text, None as ''."
    return {k: "" if v is None else str(v)[:500] for k, v in options.items()}


def tracking_callbacks(
    args,  # run options (`run.parse_args`): `track`, `track_uri`, `track_experiment` and everything to log as params
    out,  # the run folder: its name names the tracking run
) -> list:
    "Start the tracking run that `args.track` asks for and return its training callbacks ([] for none)."
    track = getattr(args, "track", "none") or "none"
    if track == "none":
        return []
    if track not in TRACKERS:
        raise UserError(f"--track must be one of {', '.join(TRACKERS)}; got {track!r}")
    if track == "tensorboard":  # fastai's own callback, event files in the run folder's tensorboard/
        try:
            import tensorboard  # noqa: F401
            from fastai.callback.tensorboard import TensorBoardCallback
        except ImportError:
            raise UserError("--track tensorboard needs TensorBoard: pip install 'fracture_fastai[track]'") from None
        return [TensorBoardCallback(log_dir=str(Path(out) / "tensorboard"), trace_model=False, log_preds=False)]
    mlflow = _mlflow()
    from mlflow.tracking import MlflowClient
    uri, artifacts = _store(getattr(args, "track_uri", None))
    client = MlflowClient(uri)
    name = getattr(args, "track_experiment", None) or "fracture_fastai"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifacts)
    run = client.create_run(experiment_id, run_name=Path(out).name, tags={"mlflow.source.name": "fracture_fastai.run"})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in _params(vars(args)).items()])
    cb = epoch_metrics(lambda step, metrics: client.log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), step) for k, v in metrics.items()]))
    cb.run_id, cb.uri = run_id, uri  # for finish_tracking
    return [cb]


def finish_tracking(
    callbacks,  # from `tracking_callbacks`
    out,  # the run folder
    status: str = "FINISHED",  # MLflow's run status: 'FINISHED' or 'FAILED'
):
    "Log the final metrics (metrics.json) and the run folder's files, and close the tracking run."
    for cb in callbacks:
        if "run_id" not in vars(cb): continue  # TensorBoard's callback has written and closed its files itself
        from mlflow.tracking import MlflowClient
        client, out = MlflowClient(cb.uri), Path(out)
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        for split, m in metrics.items():
            if isinstance(m, dict):
                for key in ("accuracy", "macro_f1", "loss"):
                    if isinstance(m.get(key), (int, float)):
                        client.log_metric(cb.run_id, f"final_{split}_{key}", float(m[key]))  # valid_loss is per epoch
        client.log_artifacts(cb.run_id, str(out))
        client.set_tag(cb.run_id, "run_folder", str(out.resolve()))
        client.set_terminated(cb.run_id, status=status)
