"""Print `name==floor` for every requirement in setup.py (install_requires and the dev extra): the
oldest versions the declared ranges admit, as a pip constraints file for `.ci/oldest`. Extras and
environment markers are dropped (a constraint on a package that is not installed is ignored)."""
import ast
import re
import sys
from pathlib import Path

setup = ast.parse(Path(__file__).resolve().parents[1].joinpath("setup.py").read_text())
call = next(node for node in ast.walk(setup) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
requirements = keywords["install_requires"] + keywords["extras_require"]["dev"]
for requirement in requirements:  # name[extras]>=floor,<bound; marker
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*,\s*<[^;]*(;.*)?", requirement)
    if match is None:
        sys.exit(f"setup.py: requirement {requirement!r} has no 'name>=floor,<bound' range")
    print(f"{match[1]}=={match[2]}")  # a constraints file names no extras
