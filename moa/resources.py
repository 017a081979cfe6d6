"""Files installed with moa: the configs of the repository's `configs/` (demo, synth, tasks, train,
deepspeed), installed as the package `moa.configs`.

The wheel keeps the repository's layout (configs/ -> moa/configs/, data/tiny/ -> moa/data/tiny/), so the
relative paths inside the YAML files (`task_dir: ../tasks`, `../../data/tiny/...`) resolve the same in a
checkout and in an installed copy.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIGS = Path(files("moa.configs"))  # a directory on disk: moa installs unzipped


def config_file(path: str | Path) -> Path:
    """The config file a command-line argument names: `path` itself if it exists, else, for a path under
    `configs/`, the installed copy of that file, so `moa train configs/train/tiny-cpu.yaml` runs from any
    directory. Any other missing path is returned as given, for the caller to report."""
    path = Path(path)
    if path.exists() or path.parts[:1] != ("configs",):
        return path
    installed = CONFIGS.joinpath(*path.parts[1:])
    return installed if installed.exists() else path
