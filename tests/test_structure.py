# The code's structure as the design states it, read from the source with ast (nothing imported): no two
# modules import each other, also not through an import inside a function; imports point one way, train.py and
# commands -> launcher -> trainer -> {strategies, models}; and `python train.py --help` imports no torch.
import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers.cli import cli_env
from tests.helpers.run import REPO

PACKAGES = ("hydra_plugins", "commands", "launcher", "trainer", "strategies", "models")
# package -> the packages of ours it may import: models/ imports nothing of ours, strategies/ never imports
# trainer/, nothing imports hydra_plugins/ but train.py, and nothing imports commands/ (the stand-alone
# commands, one floor above launcher/).
ALLOWED = {
    # Hydra's plugins (hydra_plugins/shardlab_slurm): on top
    "hydra_plugins": {"hydra_plugins", "launcher", "trainer", "strategies", "models"},
    "commands": {"commands", "launcher", "trainer", "strategies", "models"},
    "launcher": {"launcher", "trainer", "strategies", "models"},
    "trainer": {"trainer", "strategies", "models"},
    "strategies": {"strategies"},
    "models": {"models"},
}


def modules() -> dict[str, Path]:
    found = {"train": REPO / "train.py"}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    # Every module of ours this one imports, at any depth of the file (function-level imports count).
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other():
    edges = graph()
    assert len(edges) > 40  # the walk sees the project
    assert cycles(edges) == []


def test_imports_point_one_way():
    wrong = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        if a != "train"
        for b in targets
        if b.split(".")[0] not in ALLOWED[a.split(".")[0]]
    ]
    assert wrong == []


def test_help_imports_no_torch():
    # Hydra parses the command line before anything heavy loads: --help, a bad override, -m's parent.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--help"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = [
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    ]
    assert "hydra" in loaded and not any(m == "torch" or m.startswith("torch.") for m in loaded)


def test_the_cycle_finder_sees_a_cycle():
    # Its own check, so that an empty answer above means something: a cycle through three modules.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_strategies_know_their_names():
    # The seam for layouts: the loop, the planner, tune and the launcher ask a strategy object (strategies/base.py)
    # what it does; none of them compares a strategy's name. A new strategy is then its file, its conf/strategy
    # YAML, a line in strategies/__init__.py's registry and its tests.
    from strategies import STRATEGIES

    found = []
    for name, path in modules().items():
        if name.startswith("strategies"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    named = {i.value for i in items if isinstance(i, ast.Constant)} & set(STRATEGIES)
                    found += [f"{name}:{node.lineno} compares {sorted(named)}"] if named else []
    assert found == []
