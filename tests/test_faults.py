"""Bad input, misplaced outputs and interruptions: every verb refuses them in one line (exit 2, or 130 for
Ctrl-C) before any work, and leaves the files on disk as they were, byte for byte."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import fresh_base, randomize_adapters
from safetensors.torch import load_file, save_file
from train_helpers import ROOT, moa_train, run_env, tiny_config

import moa
from moa import saved_run
from moa.base_model import BaseModelConfig
from moa.atomic import check_output_dir
from moa.cli import main
from moa.errors import UsageError
from moa.tiny import byte_tokenizer
from moa.training.data import StageData

CULTURES = ["japan", "nigeria", "united_states"]
TINY = {"family": "llama", "vocab_size": 131}  # max_position_embeddings 2048


def snapshot(root: Path) -> dict:
    """Every file under `root` with its bytes, and every directory."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def moa_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `moa ARGV` run in this process."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """RUN/final (a saved run) beside the other files a training run holds."""
    model = moa.MoAForCausalLM.from_base(fresh_base(**TINY), moa.MoAConfig(cultures=CULTURES, r=4, alpha=8))
    randomize_adapters(model, std=0.2, seed=1)
    run = tmp_path_factory.mktemp("faults") / "RUN"
    model.save_pretrained(run / "final", base_spec=BaseModelConfig(tiny=TINY))
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "checkpoints" / "step_4" / "state.json").write_text('{"step": 4}\n')
    return run


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Tea?", "culture": "japan"}\n{"prompt": "Greet an elder."}\n')
    return path


def damaged_copy(run_dir: Path, tmp_path: Path, change) -> Path:
    """A copy of RUN/final whose weights file `change(path)` damaged."""
    copy = tmp_path / "damaged"
    copy.mkdir()
    for p in (run_dir / "final").iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    change(copy / saved_run.WEIGHTS_NAME)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def with_nan(path: Path) -> None:
    weights = load_file(str(path))
    key = sorted(k for k in weights if k.endswith("lora_A"))[0]
    weights[key][0, 0, 0] = float("nan")
    save_file(weights, str(path))


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_into_the_runs_directory_is_refused_and_the_run_is_untouched(run_dir, capsys, overwrite):
    before = snapshot(run_dir)
    for out in (run_dir, run_dir / "final", run_dir.parent):
        code, err = moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "peft", "--output-dir", out, *overwrite)
        assert code == 2
        assert "refusing to replace it (with or without --overwrite)" in one_error_line(err)
    assert snapshot(run_dir) == before
    assert not list(run_dir.parent.glob(".*tmp-*"))


def test_export_replaces_only_an_earlier_export_unless_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    code, err = moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "peft", "--output-dir", out)
    assert code == 2
    assert f"output directory {out} is not empty (todo.txt)" in one_error_line(err) and "--overwrite" in err
    assert snapshot(out) == {"todo.txt": b"keep me"}
    assert not list(tmp_path.glob(".*tmp-*"))
    export = tmp_path / "export"
    for _ in range(2):  # a new directory, then its own earlier export: no --overwrite needed
        assert moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "peft", "--output-dir", export)[0] == 0
    assert (export / "manifest.json").is_file()
    code, err = moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "merged", "--culture", "japan",
                        "--output-dir", export)
    assert code == 2 and "no config.json in it" in one_error_line(err)  # a peft export is not a merged one
    assert moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "peft", "--output-dir", out, "--overwrite")[0] == 0
    assert (out / "manifest.json").is_file() and not (out / "todo.txt").exists()


def test_the_current_directory_is_never_replaced(run_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", ".."):
        code, err = moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "peft", "--output-dir", out,
                            "--overwrite")
        assert code == 2 and "the current directory" in one_error_line(err)
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert check_output_dir(".", "results.json", replace=False) == work  # eval, synth, train write files into it


def test_outputs_are_checked_before_the_run(run_dir, tmp_path, prompts, capsys):
    # the model is damaged too: the output error comes first, so no model was read
    damaged = damaged_copy(run_dir, tmp_path, truncate)
    folder = tmp_path / "folder"
    folder.mkdir()
    code, err = moa_cli(capsys, "generate", "--model", damaged, "--prompts", prompts, "--output", folder)
    assert code == 2 and f"output {folder} is a directory: expected a file path" in one_error_line(err)
    data = tmp_path / "test.jsonl"
    data.write_text("")
    as_file = tmp_path / "results"
    as_file.write_text("mine")
    code, err = moa_cli(capsys, "eval", "--model", damaged, "--data", data, "--output-dir", as_file)
    assert code == 2 and f"output directory {as_file} is a file" in one_error_line(err)
    assert as_file.read_text() == "mine" and list(folder.iterdir()) == []
    code, err = moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output", prompts)
    assert code == 2 and "is the input" in one_error_line(err)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    code, err = moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output", notes)
    assert code == 2 and "is not an earlier output of this kind" in one_error_line(err)
    assert notes.read_text() == '{"mine": 1}\n'


def test_outputs_follow_the_umask(run_dir, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, _ = moa_cli(capsys, "export", "--model", run_dir / "final", "--format", "peft", "--output-dir", tmp_path / "out")
        assert code == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o640
    assert (out / "japan").stat().st_mode & 0o777 == 0o750


def test_train_refuses_an_earlier_run_or_user_files_unless_overwrite(run_dir, tmp_path, capsys):
    config = tiny_config(tmp_path)
    before = snapshot(run_dir)
    code, err = moa_cli(capsys, "train", config, "--output-dir", run_dir, "--no-progress")
    assert code == 2
    assert f"output directory {run_dir} is not empty (checkpoints, final, metrics.jsonl)" in one_error_line(err)
    assert "--overwrite to delete it or --resume to continue the run in it" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my own numbers\n")
    assert moa_cli(capsys, "train", config, "--output-dir", mine, "--no-progress")[0] == 2
    assert (mine / "metrics.jsonl").read_text() == "my own numbers\n"
    code, err = moa_cli(capsys, "train", config, "--output-dir", mine, "--resume", "--no-progress")
    assert code == 2 and "no train_config.json in it" in one_error_line(err)
    code, err = moa_cli(capsys, "train", config, "--output-dir", tmp_path, "--overwrite", "--no-progress")
    assert code == 2 and f"contains the input {config}" in one_error_line(err)
    assert snapshot(run_dir) == before and (mine / "metrics.jsonl").read_text() == "my own numbers\n"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("verb", ["generate", "export"])
def test_a_truncated_adapters_file_is_one_line(run_dir, tmp_path, prompts, capsys, verb):
    damaged = damaged_copy(run_dir, tmp_path, truncate)
    argv = (["--prompts", prompts, "--output", tmp_path / "out.jsonl"] if verb == "generate"
            else ["--format", "peft", "--output-dir", tmp_path / "out"])
    code, err = moa_cli(capsys, verb, "--model", damaged, *argv)
    assert code == 2
    assert f"{damaged / saved_run.WEIGHTS_NAME}: not a readable safetensors file" in one_error_line(err)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out").exists()


def test_nan_weights_are_refused_naming_the_tensor(run_dir, tmp_path, prompts, capsys):
    damaged = damaged_copy(run_dir, tmp_path, with_nan)
    key = sorted(k for k in load_file(str(damaged / saved_run.WEIGHTS_NAME)) if k.endswith("lora_A"))[0]
    with pytest.raises(UsageError, match=f"{key} holds 1 NaN or Inf values"):
        saved_run.read_weights(damaged, saved_run.read_config(damaged))
    code, err = moa_cli(capsys, "generate", "--model", damaged, "--prompts", prompts, "--output", tmp_path / "out.jsonl")
    assert code == 2 and key in one_error_line(err) and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--top-p", "2", "'top_p' must be a number in (0, 1], got 2.0"),
    ("--top-p", "0", "'top_p' must be a number in (0, 1], got 0.0"),
    ("--temperature", "-1", "'temperature' must be a number in [0, 2], got -1.0"),
    ("--temperature", "nan", "'temperature' must be a number in [0, 2], got nan"),
    ("--top-k", "4", "top_k must be between 1 and the run's 3 cultures, got 4"),
])
def test_sampling_parameters_out_of_range(run_dir, tmp_path, prompts, capsys, option, value, message):
    code, err = moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output",
                        tmp_path / "out.jsonl", "--do-sample", "--routing", "topk", option, value, "--no-progress")
    assert code == 2 and message in one_error_line(err) and not (tmp_path / "out.jsonl").exists()


def test_unknown_prompt_keys_are_refused(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tea?"}\n{"prompt": "Tea?", "top_p": 2, "cultre": "japan"}\n')
    code, err = moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output",
                        tmp_path / "out.jsonl")
    assert code == 2
    assert f"{prompts}:2: unknown keys ['cultre', 'top_p']: expected only ['prompt', 'culture', 'id', 'culture_hint', 'locale']" in err


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Tea?", "id": "short"}, {"prompt": "a" * 2100, "id": "long"}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    code, err = moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output", out,
                        "--max-new-tokens", "8", "--no-progress")
    assert code == 2 and not out.exists()
    assert ("row 1 (id 'long'): the prompt is 2118 tokens, but the model's context of 2048 positions minus "
            "max_new_tokens 8 leaves 2040") in one_error_line(err)
    assert moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output", out,
                   "--max-new-tokens", "8", "--truncate", "left", "--no-progress")[0] == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["short", "long"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(run_dir, tmp_path, prompts, capsys):
    code, err = moa_cli(capsys, "generate", "--model", run_dir / "final", "--prompts", prompts, "--output",
                        tmp_path / "out.jsonl", "--device", "cuda")
    assert code == 2 and "--device 'cuda', but 0 CUDA device(s) are available here: expected --device cpu" in one_error_line(err)


def test_training_rows_of_a_culture_the_run_lacks_are_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    row = {"culture": "japan", "task": "open", "prompt": "Tea?", "response": "Green."}
    data.write_text(json.dumps(row) + "\n" + json.dumps({**row, "culture": "india"}) + "\n")
    with pytest.raises(UsageError, match=r"1 row\(s\) of cultures \['india'\], which the run does not train"):
        StageData([data], byte_tokenizer(), ["japan", "nigeria"], 64)


def test_a_corrupt_synth_cache_is_one_line(tmp_path):
    out = tmp_path / "synth"
    argv = [sys.executable, "-m", "moa", "synth", str(ROOT / "configs" / "synth" / "tiny.yaml"), "samples_per_task=1",
            "cultures=[japan]", "tasks=[mcq]", "--output-dir", str(out), "--no-progress"]
    subprocess.run(argv, check=True, capture_output=True, env=run_env())
    (out / "work" / "cache.sqlite").write_bytes(b"not a database" * 100)
    before = snapshot(out)
    result = subprocess.run(argv, capture_output=True, text=True, env=run_env())
    assert result.returncode == 2
    assert f"{out / 'work' / 'cache.sqlite'}: not a readable SQLite cache" in one_error_line(result.stderr)
    assert snapshot(out) == before


@pytest.mark.parametrize("argv, message", [
    # a model this large would take minutes and tens of GB to build: the error comes before it
    (["e2e", "--providers", "base,vllm", "--hidden-size", "65536", "--layers", "64"], "unknown providers ['vllm']"),
    (["train", "--providers", "moa_joint,vllm"], "unknown providers ['vllm']"),
    (["kernels", "--providers", "cuda", "--device", "cpu"], "unknown providers ['cuda']"),
])
def test_bench_argument_errors_are_one_line_before_any_model(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "moa", "bench", *argv, "--json", str(tmp_path / "b.json")],
                            capture_output=True, text=True, env=run_env(), cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and message in one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_bug_keeps_its_traceback(monkeypatch):
    import moa.infer.cli

    def run(args):
        raise KeyError("not the user's doing")

    monkeypatch.setattr(moa.infer.cli, "run", run)
    with pytest.raises(KeyError, match="not the user's doing"):
        main(["generate", "--model", "m", "--prompts", "p", "--output", "o"])


# ---------------------------------------------------------------------------------------------- interrupts
@pytest.mark.slow
def test_sigint_during_training_is_one_line_and_the_run_resumes(tmp_path):
    # many steps after the first checkpoint, so the interrupt lands mid-run even on a loaded machine
    config = tiny_config(tmp_path, save_interval=2, stages={1: {"steps": 96}})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moa", "train", str(config), "--output-dir", str(out), "--no-progress"]
    # SIGINT at its default: a shell starting the tests in the background (`cmd &`) ignores SIGINT, the child
    # would inherit that, and Python installs its KeyboardInterrupt handler only where SIGINT is at its default
    process = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("step_*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: interrupted; rerun the same command with --resume to continue "
                                            "from the latest complete checkpoint")
    assert not (out / "final").exists()
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # every line whole
    refused = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "or --resume to continue the run in it" in one_error_line(refused.stderr)
    moa_train(config, "--output-dir", out, "--resume")
    assert (out / "final" / saved_run.WEIGHTS_NAME).is_file()
