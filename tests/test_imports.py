"""The layout's rules, read from the code's imports with an AST walk (nothing is imported or run):
no file-level import cycle among `transfusion_mot`, `vae` and `eval`; data flows one way (the command line,
then recipes, then training and inference, then data and the model, then the shared building blocks); `vae`
and `eval` use only the model-free parts of `transfusion_mot`; the sequence format does not import the
network; and every module with logic has a test file that mirrors its path."""

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("transfusion_mot", "vae", "eval")


def modules() -> dict[str, Path]:
    """dotted module name -> file, for every .py file of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports, at any depth of the file (lazy imports count too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            # the longest known prefix: `from .common import checkpoint` imports transfusion_mot.common.checkpoint
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(name, path, known) for name, path in mods.items()}
    # importing a submodule runs its packages' __init__ files, but those only hold docstrings and re-exports of
    # their own modules: edges to package names are dropped so `import vae.latents` is not `vae -> everything`
    return {name: {t for t in targets if mods[t].name != "__init__.py"} for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_lazy_and_relative_imports(graph):
    assert "transfusion_mot.recipes.train" in graph["transfusion_mot.cli"]  # imported inside cmd_train
    assert "transfusion_mot.common.loop" in graph["transfusion_mot.training.trainer"]  # from ..common...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None


# the layers, top to bottom: a module may import its own layer's modules and any layer below it
LAYERS = [
    ("cli", ["transfusion_mot.cli", "transfusion_mot.__main__", "eval.cli", "eval.__main__"]),
    ("recipes", ["transfusion_mot.recipes"]),
    ("training / inference", ["transfusion_mot.training", "transfusion_mot.inference", "eval"]),
    ("run and the model", ["transfusion_mot.run_dir", "transfusion_mot.model", "transfusion_mot.losses",
                           "transfusion_mot.accounting", "transfusion_mot.diffusion", "transfusion_mot.masks",
                           "transfusion_mot.pretrained",
                           "vae"]),
    ("sequence format", ["transfusion_mot.batch", "transfusion_mot.tokenizer", "transfusion_mot.config"]),
    ("data", ["transfusion_mot.data"]),
    ("building blocks", ["transfusion_mot.common"]),
]


def layer_of(name: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{name} belongs to no layer"
    return level


def test_data_flows_one_way(graph):
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if a not in ("transfusion_mot", "vae", "eval") and layer_of(b) < layer_of(a)]
    assert not upward, "imports that climb back up the layers: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_vae_and_eval_use_only_the_model_free_parts(graph):
    allowed = ("transfusion_mot.common", "transfusion_mot.data")
    bad = [(a, b) for a, targets in graph.items() if a.split(".")[0] in ("vae", "eval") for b in targets
           if b.startswith("transfusion_mot") and not b.startswith(allowed)]
    assert not bad, bad


def test_the_sequence_format_does_not_import_the_network(graph):
    for name in ("transfusion_mot.batch", "transfusion_mot.tokenizer"):
        assert "transfusion_mot.model" not in graph[name]


def has_logic(path: Path) -> bool:
    """A module with a function or a method (a file of constants, re-exports or error classes has none)."""
    tree = ast.parse(path.read_text())
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree))


def test_every_module_with_logic_has_a_test_file():
    """transfusion_mot/X.py -> tests/test_X.py; transfusion_mot/PKG/X.py -> tests/PKG/test_X.py;
    vae/X.py and eval/X.py -> tests/vae/test_X.py, tests/eval/test_X.py. Entry points (__main__) are run by the
    command-line tests."""
    missing = []
    for name, path in modules().items():
        parts = name.split(".")
        if path.name in ("__init__.py", "__main__.py") or not has_logic(path):
            continue
        folder = parts[1:-1] if parts[0] == "transfusion_mot" else parts[:-1]
        expected = REPO / "tests" / Path(*folder) / f"test_{parts[-1]}.py" if folder else REPO / "tests" / f"test_{parts[-1]}.py"
        if not expected.is_file():
            missing.append(f"{path.relative_to(REPO)} -> {expected.relative_to(REPO)}")
    assert not missing, "modules without a test file: " + "; ".join(missing)
