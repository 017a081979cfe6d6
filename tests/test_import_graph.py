"""The package's modules import each other without cycles, counting imports inside functions too, and the
library (the op, the model, its config and saved runs) never imports an application (training, serving, eval, ...)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moa"


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(("moa", *parts))] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules `name` imports, resolved to the longest known module name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    files = module_files()
    assert "moa.model" in files and "moa.kernels.multi_lora" in files
    # a package's __init__ importing its own submodules is how it re-exports them, not a cycle
    graph = {name: {m for m in imports_of(name, path, set(files)) if not (path.name == "__init__.py" and m.startswith(name + "."))}
             for name, path in files.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


LIBRARY = ["moa.kernels", "moa.model", "moa.routing", "moa.layers", "moa.compat", "moa.saved_run", "moa.config"]
APPLICATIONS = ["moa.training", "moa.serve", "moa.eval", "moa.infer", "moa.synth", "moa.bench", "moa.demo", "moa.cli"]


def upward_import(graph: dict[str, set[str]]) -> list[str] | None:
    """An import chain from a library module (LIBRARY, the modules under it, and everything they import) to an
    application module, or None."""
    def is_application(name):
        return any(name == app or name.startswith(app + ".") for app in APPLICATIONS)

    chains = {name: [name] for name in graph if any(name == lib or name.startswith(lib + ".") for lib in LIBRARY)}
    todo = list(chains)
    while todo:
        name = todo.pop()
        for nxt in sorted(graph[name]):
            if is_application(nxt):
                return chains[name] + [nxt]
            if nxt not in chains:
                chains[nxt] = chains[name] + [nxt]
                todo.append(nxt)
    return None


def test_library_never_imports_an_application():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    chain = upward_import(graph)
    assert chain is None, "library module reaches an application: " + " -> ".join(chain)


def test_upward_import_finder_finds_one():
    graph = {"moa.model": {"moa.data"}, "moa.data": {"moa.eval.scoring"}, "moa.eval.scoring": set(), "moa.eval": set()}
    assert upward_import(graph) == ["moa.model", "moa.data", "moa.eval.scoring"]
    assert upward_import({"moa.model": {"moa.data"}, "moa.data": set(), "moa.eval": {"moa.model"}}) is None
