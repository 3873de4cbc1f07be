"--track mlflow: one tiny real run logged to a real local MLflow store, read back with MLflow's own client."
import json

import pytest

mlflow = pytest.importorskip("mlflow", reason="MLflow (extra 'track') not installed")


def test_a_tracked_run_is_readable_in_mlflow_and_its_export_is_clean(tmp_path, one_torch_thread):
    from mlflow.tracking import MlflowClient

    from fracture_fastai.run import parse_args, run
    store, out = tmp_path / "mlruns", tmp_path / "run"
    run(parse_args(["--arch", "cnn", "--size", "32", "--epochs", "2", "--lr", "1e-3", "--sample", "4", "--num-workers",
                    "0", "--out", str(out), "--track", "mlflow", "--track-uri", str(store)]))
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("fracture_fastai").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["arch"] == "cnn" and found.data.params["epochs"] == "2"
    history = client.get_metric_history(found.info.run_id, "valid_loss")
    assert [m.step for m in history] == [0, 1]  # one value per training epoch, none from evaluation's get_preds
    metrics = json.loads((out / "metrics.json").read_text())
    assert found.data.metrics["final_valid_accuracy"] == pytest.approx(metrics["valid"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.json", "metrics.json", "predictions.csv", "model.safetensors", "export.pkl"} <= artifacts
    # The tracking callback was taken out before the export: nothing in export.pkl names it or MLflow.
    assert b"EpochMetrics" not in (out / "export.pkl").read_bytes() and b"mlflow" not in (out / "export.pkl").read_bytes()


def test_tensorboard_writes_event_files_into_the_run_folder(tmp_path, one_torch_thread):
    pytest.importorskip("tensorboard", reason="TensorBoard (extra 'track') not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fracture_fastai.run import parse_args, run
    out = tmp_path / "run"
    run(parse_args(["--arch", "cnn", "--size", "32", "--epochs", "2", "--lr", "1e-3", "--sample", "4", "--num-workers",
                    "0", "--out", str(out), "--track", "tensorboard"]))
    [events] = list((out / "tensorboard").glob("events.out.tfevents.*"))  # one fit (no head-only phase for cnn)
    acc = EventAccumulator(str(events)).Reload()
    assert len(acc.Scalars("valid_loss")) == 2 and len(acc.Scalars("accuracy")) == 2  # one per epoch
    assert b"TensorBoard" not in (out / "export.pkl").read_bytes()
