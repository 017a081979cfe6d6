"""Experiment trackers: the rows of metrics.jsonl, and the training config, sent to TensorBoard, Weights & Biases,
MLflow or trackio (`report_to` in the training config; any subset).

Each tracker is an optional extra (`pip install 'moa-cultures[wandb]'`) and is set up as its users know it,
through its own environment variables (WANDB_MODE=offline, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...). A metrics row
becomes the scalars `<kind>/<key>` and `<kind>/<key>/<culture>` (kind: train or eval) at the row's step; text
and empty values (the stage name, a routing accuracy without router loss) are left out. The project (wandb,
trackio) or experiment (MLflow) is `moa` unless WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME names another; wandb and
MLflow name the run after the output directory, trackio names it itself.

OUT/trackers.json keeps each tracker's run id and the last step logged per kind, so a resumed run continues the
same tracker runs and sends no row twice (the rows a killed run logged past its checkpoint are not re-sent).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from moa.atomic import atomic_file
from moa.errors import UsageError

STATE_NAME = "trackers.json"


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, keyed `<kind>/<key>` and `<kind>/<key>/<sub>` for a mapping."""
    values = {}
    for key, value in row.items():
        if isinstance(value, dict):
            values.update({f"{row['kind']}/{key}/{sub}": v for sub, v in value.items() if v is not None})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            values[f"{row['kind']}/{key}"] = value
    return values


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and text values (MLflow params)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = "tensorboard"
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        if run_id is None:
            self.writer.add_text("config", json.dumps(config, indent=2))

    def log(self, step: int, values: dict):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "moa"), name=out_dir.name, id=run_id,
                              resume="allow" if run_id else None, config=config, dir=str(out_dir),
                              settings=wandb.Settings(console="off"))
        self.run_id = self.run.id

    def log(self, step: int, values: dict):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class MLflow:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        if run_id is None:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "moa"))
        self.run_id = mlflow.start_run(run_id=run_id, run_name=None if run_id else out_dir.name).info.run_id
        if run_id is None:
            mlflow.log_params(flatten(config))

    def log(self, step: int, values: dict):
        self.mlflow.log_metrics(values, step=step)

    def close(self):
        self.mlflow.end_run()


class Trackio:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        import trackio

        self.trackio = trackio
        self.run_id = trackio.init(project="moa", name=run_id, config=config, resume="must" if run_id else "never",
                                   embed=False).name

    def log(self, step: int, values: dict):
        self.trackio.log(values, step=step)

    def close(self):
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}  # each its package's name


def check_installed(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed, naming the extra that installs it."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"report_to {name!r} needs the {name} package: pip install 'moa-cultures[{name}]' (or drop "
                             f"{name!r} from report_to)")


class Trackers:
    """The trackers `names` for the run in `out_dir`: each metrics row goes to every one of them, once."""

    def __init__(self, names: list[str], out_dir: Path, config: dict, resume: bool):
        self.path = out_dir / STATE_NAME
        state = json.loads(self.path.read_text()) if resume and self.path.exists() else {"runs": {}, "logged": {}}
        self.trackers = [TRACKERS[name](out_dir, config, state["runs"].get(name)) for name in names]
        self.state = {"runs": {name: t.run_id for name, t in zip(names, self.trackers)}, "logged": state["logged"]}
        self._save()

    def log(self, row: dict):
        if row["step"] <= self.state["logged"].get(row["kind"], 0):  # sent before the run was resumed
            return
        values = scalars(row)
        for tracker in self.trackers:
            tracker.log(row["step"], values)
        self.state["logged"][row["kind"]] = row["step"]
        self._save()

    def close(self):
        for tracker in self.trackers:
            tracker.close()

    def _save(self):
        with atomic_file(self.path) as f:
            f.write(json.dumps(self.state, indent=2) + "\n")
