"""Every Python snippet of the README runs as written (the server snippet against a real `moa serve`)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_text_run

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
SERVER_URL = "http://127.0.0.1:8000"


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 3 and sum(SERVER_URL in s for s in SNIPPETS) == 1


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if SERVER_URL not in s], ids=lambda s: s.split("\n")[0])
def test_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write relative paths (ckpt/, peft_japan/)
    exec(compile(snippet, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.slow  # a `moa serve` subprocess
def test_server_snippet_runs_against_moa_serve(tmp_path):
    snippet = next(s for s in SNIPPETS if SERVER_URL in s)
    run = save_text_run(tmp_path / "run", ["japan", "india", "nigeria"])
    server = subprocess.Popen([sys.executable, "-m", "moa", "serve", "--model", str(run), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = re.search(r"on (http://[\d.]+:\d+)$", server.stdout.readline().strip()).group(1)
        script = tmp_path / "snippet.py"
        script.write_text(snippet.replace(SERVER_URL, url))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "'culture':" in result.stdout and "'router_confidence':" in result.stdout
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
