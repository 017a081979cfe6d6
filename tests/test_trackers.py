"""Experiment trackers (`report_to`), each in its offline mode, against metrics.jsonl: one tiny run with all four
trackers on two DeepSpeed processes (only rank 0 reports), killed after a checkpoint (its last checkpoint removed) and
resumed on one process, then every tracker's own files read back with its own reader: TensorBoard's EventAccumulator,
the records of the offline wandb run, MLflow's client on a file store, trackio's SQLite storage."""
import json
import shutil
import struct
import sys

import pytest
from train_helpers import metrics, moa_train, tiny_config, torchrun_train

from moa.errors import UsageError
from moa.training.config import TrainConfig
from moa.training.trackers import check_installed, flatten, scalars

TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
    """(output dir, MLflow tracking URI, trackio dir) of a 4-step run on 2 processes with validation every 2 steps,
    checkpoints at 2 and 4; the checkpoint at 4 removed and the run resumed from 2 on 1 process, so steps 3 and 4 are
    logged twice."""
    tmp = tmp_path_factory.mktemp("trackers")
    uri, trackio_dir = f"file:{tmp / 'mlruns'}", tmp / "trackio"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRACKIO_DIR": str(trackio_dir)}
    for key, value in env.items():
        monkeypatch_module.setenv(key, value)
    config = tiny_config(tmp, report_to=TRACKERS, eval_interval=2, eval_rows=8, save_interval=2)
    out = tmp / "out"
    torchrun_train(2, config, "--output-dir", out, "--max-steps", "4")
    shutil.rmtree(out / "checkpoints" / "step_000004")
    moa_train(config, "--output-dir", out, "--max-steps", "4", "--resume")
    return out, uri, trackio_dir


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def expected(out) -> dict[str, dict[int, float]]:
    """{scalar name: {step: value}} of metrics.jsonl, every row once."""
    rows = metrics(out, "train") + metrics(out, "eval")
    assert [r["step"] for r in metrics(out, "train")] == [1, 2, 3, 4] and [r["step"] for r in metrics(out, "eval")] == [2, 4]
    found = {}
    for row in rows:
        for key, value in scalars(row).items():
            found.setdefault(key, {})[row["step"]] = value
    assert {"train/loss", "train/lm_loss", "train/lr", "train/lm_loss_per_culture/japan", "eval/lm_loss",
            "eval/lm_loss_per_culture/nigeria"} <= set(found)
    return found


def once(points: list[tuple[int, float]]) -> dict[int, float]:
    steps = [step for step, _ in points]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return dict(points)


WALL_CLOCK = {"train/tokens_per_s", "train/step_s"}  # steps 3 and 4 ran twice: trackers keep the first run's times


def assert_same(found: dict[str, dict[int, float]], out):
    want = expected(out)
    assert sorted(found) == sorted(want)
    for key, values in want.items():
        assert sorted(found[key]) == sorted(values), key
        if key in WALL_CLOCK:
            found[key], values = {s: found[key][s] for s in (1, 2)}, {s: values[s] for s in (1, 2)}
        # steps 3 and 4 ran on 2 processes, then on 1 (fp32 sums in another order); TensorBoard keeps float32
        assert found[key] == pytest.approx(values, rel=1e-5), key


def train_config(out) -> dict:
    return json.loads((out / "train_config.json").read_text())


@pytest.mark.slow
def test_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run[0]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert len(list((out / "tensorboard").iterdir())) == 2  # one events file per run, from rank 0
    assert_same({tag: once([(e.step, e.value) for e in events.Scalars(tag)]) for tag in events.Tags()["scalars"]}, out)
    (config,) = events.Tensors("config/text_summary")
    assert json.loads(config.tensor_proto.string_val[0]) == train_config(out)


def wandb_records(path):
    """The protobuf records of a wandb run file: LevelDB log format (32 KiB blocks of chunks with a 7-byte header:
    CRC, length, type FULL=1, FIRST=2, MIDDLE=3, LAST=4) after wandb's 7-byte file header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, record = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        record += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield Record.FromString(record)
            record = b""


@pytest.mark.slow
def test_wandb_offline(run):
    out = run[0]
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({p.name for p in runs}) == 1  # rank 0 of each run, on the same wandb run id
    found, config = {}, {}
    for record in (r for path in runs for r in wandb_records(path)):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    found.setdefault(key, []).append((step, json.loads(item.value_json)))
        elif record.WhichOneof("record_type") in ("config", "run"):
            updates = record.config.update if record.HasField("config") else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    assert_same({key: once(points) for key, points in found.items()}, out)
    assert {key: value for key, value in config.items() if not key.startswith("_")} == train_config(out)


@pytest.mark.slow
def test_mlflow_file_store(run):
    from mlflow.tracking import MlflowClient

    out, uri, _ = run
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((out / "trackers.json").read_text())["runs"]["mlflow"]
    keys = client.get_run(run_id).data.metrics
    assert_same({key: once([(m.step, m.value) for m in client.get_metric_history(run_id, key)]) for key in keys}, out)
    assert client.get_run(run_id).data.params == flatten(train_config(out))
    experiment = client.get_experiment_by_name("moa")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]


@pytest.mark.slow
def test_trackio_local_storage(run, monkeypatch):
    from trackio import sqlite_storage

    out, _, trackio_dir = run
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", trackio_dir)  # trackio reads TRACKIO_DIR when imported
    name = json.loads((out / "trackers.json").read_text())["runs"]["trackio"]
    assert sqlite_storage.SQLiteStorage.get_runs("moa") == [name]
    found = {}
    for log in sqlite_storage.SQLiteStorage.get_logs("moa", name):
        for key, value in log.items():
            if "/" in key:
                found.setdefault(key, []).append((log["step"], value))
    assert_same({key: once(points) for key, points in found.items()}, out)
    config = sqlite_storage.SQLiteStorage.get_run_config("moa", name)
    assert {key: value for key, value in config.items() if not key.startswith("_")} == train_config(out)


def test_report_to_names_known_trackers_and_their_extras(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="report_to"):
        TrainConfig.from_file(tiny_config(tmp_path, report_to=["neptune"]))
    assert TrainConfig.from_file(tiny_config(tmp_path, report_to=TRACKERS)).report_to == TRACKERS
    check_installed(TRACKERS)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(UsageError, match=r"report_to 'wandb' needs the wandb package: pip install 'moa-cultures\[wandb\]'"):
        check_installed(TRACKERS)

