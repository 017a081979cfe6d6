"""The `moa` command and the files installed with moa: the parser of a verb loads only that verb, every
command's `--help` works, and the configs are found from any directory."""
import filecmp
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moa.bench.cli import COMMANDS as BENCHES
from moa.cli import VERBS, main
from moa.resources import CONFIGS, config_file

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "peft", "deepspeed"}
PROBE = """import sys
from moa.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(sorted({name.split(".")[0] for name in sys.modules} & %r))
"""


@pytest.mark.parametrize("argv", [[], ["train"], ["synth"], ["eval"], ["generate"], ["bench"]], ids=" ".join)
def test_help_imports_no_torch(argv):
    """`moa --help` and these verbs' `--help` import none of torch, transformers, peft, deepspeed."""
    probe = subprocess.run([sys.executable, "-c", PROBE % HEAVY, *argv, "--help"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [[verb] for verb in VERBS if verb != "bench"] + [["bench", name] for name in BENCHES],
                         ids=" ".join)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    assert f"usage: moa {' '.join(argv)} " in capsys.readouterr().out


def test_version(capsys):
    from moa import __version__

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"moa {__version__} (distribution moa-cultures)\n"


@pytest.mark.parametrize("argv, message", [(["nope"], "invalid choice: 'nope'"), (["bench"], "required: BENCH"),
                                           (["bench", "nope"], "invalid choice: 'nope'")])
def test_unknown_or_missing_command(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_installed_configs_are_the_repository_configs():
    files = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.*") if "__pycache__" not in p.parts)
    assert files and files == sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.*") if "__pycache__" not in p.parts)
    assert all(filecmp.cmp(ROOT / "configs" / f, CONFIGS / f, shallow=False) for f in files)


def test_config_paths_name_the_installed_copy_when_missing_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file("configs/train/tiny-cpu.yaml") == CONFIGS / "train" / "tiny-cpu.yaml"
    assert config_file("configs/deepspeed/zero3.json") == CONFIGS / "deepspeed" / "zero3.json"
    assert config_file("configs/train/nope.yaml") == Path("configs/train/nope.yaml")  # the caller reports it
    assert config_file("train/tiny-cpu.yaml") == Path("train/tiny-cpu.yaml")  # only paths under configs/
    (tmp_path / "configs" / "train").mkdir(parents=True)
    (tmp_path / "configs" / "train" / "tiny-cpu.yaml").write_text("{}\n")
    assert config_file("configs/train/tiny-cpu.yaml") == Path("configs/train/tiny-cpu.yaml")  # a file here wins


@pytest.mark.slow
def test_wheel_ships_configs_tiny_data_and_bundled_data(tmp_path):
    """The wheel holds configs/ as moa/configs/, data/tiny/ as moa/data/tiny/, moa/data/bundled/, the op's C++ source,
    and nothing outside moa/ (no top-level module to shadow another distribution's)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True)
    [wheel] = (tmp_path / "wheel").glob("moa_cultures-*.whl")  # the distribution's name; the import package is moa
    shipped = set(zipfile.ZipFile(wheel).namelist())
    metadata = zipfile.ZipFile(wheel).read(next(n for n in shipped if n.endswith(".dist-info/METADATA"))).decode()
    assert "Name: moa-cultures" in metadata and re.search(r"^License(-Expression)?: Apache-2.0$", metadata, re.M)
    assert "Requires-Dist: triton<3.10,>=3.7; platform_system == \"Linux\"" in metadata
    assert "# moa: one model, many cultures" in metadata  # the README as the long description
    assert any(n.endswith("LICENSE") for n in shipped)
    expected = {f"moa/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.*")}
    expected |= {f"moa/data/tiny/{p.name}" for p in (ROOT / "data" / "tiny").glob("*.json*")}
    expected |= {f"moa/data/bundled/{p.name}" for p in (ROOT / "moa" / "data" / "bundled").iterdir()}
    expected |= {"moa/kernels/multi_lora/csrc/lora_decode.cpp", "moa/kernels/multi_lora/triton_backend.py",
                 "moa/training/trainer.py"}
    expected = {name for name in expected if "__pycache__" not in name}
    assert len(expected) > 20 and expected <= shipped, sorted(expected - shipped)
    assert {name.split("/")[0] for name in shipped if not name.split("/")[0].endswith(".dist-info")} == {"moa"}
