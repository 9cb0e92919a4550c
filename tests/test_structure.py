"""The package's layering (../shared/DESIGN.md "Layers of the code"): imports only point down.
Every `import` and `from ... import` in fastlora's sources, at module level or inside a function
(a lazy import still closes a cycle), is read from the AST and resolved to fastlora modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick  # the whole module is in the quick tier


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastlora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The fastlora module `name` is, or the package holding it (an attribute import)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The fastlora modules `module` imports, itself excluded. A package's __init__ runs before
    any of its modules anyway; an edge to it means the module uses a name it defines (`import
    fastlora`, `from .. import __version__`)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from X import y`: y is a submodule of X or a name inside X
            targets = [f"{prefix}.{alias.name}" for alias in node.names]
        for target in targets:
            hit = _resolve(target)
            if hit and hit != module:
                found.add(hit)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycle(graph: dict) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walker_finds_a_planted_cycle_and_lazy_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # a function-level import counts: fastlora.ops.linear imports the launchers lazily
    assert "fastlora.launch.forward" in GRAPH["fastlora.ops.linear"]


@pytest.mark.parametrize("module,allowed", [
    # the format knows nothing of fastlora
    ("fastlora.quant", set()),
    # the checks sit on the format only
    ("fastlora.checks", {"fastlora.quant"}),
    # the reference imports only the format and the checks
    ("fastlora.reference", {"fastlora.quant", "fastlora.checks"}),
])
def test_the_bottom_layers_import_only_what_is_below(module, allowed):
    assert GRAPH[module] <= allowed, GRAPH[module] - allowed


def test_launchers_and_ops_stay_below_the_integration_and_tools():
    above = {"fastlora.modules", "fastlora.peft_patch", "fastlora.cli", "fastlora.demo",
             "fastlora.verify", "fastlora.compilecheck", "fastlora.cases", "fastlora"}
    above |= {m for m in MODULES if m.startswith("fastlora.bench")}
    for module in MODULES:
        if module.startswith(("fastlora.launch", "fastlora.ops")):
            assert not GRAPH[module] & above, (module, GRAPH[module] & above)
        if module.startswith("fastlora.launch"):  # launchers are below the ops
            assert not any(m.startswith("fastlora.ops") for m in GRAPH[module]), module


def test_every_op_family_has_a_module_of_its_own():
    import fastlora
    from fastlora.ops import dequant, linear

    assert fastlora.lora_linear_4bit is linear.lora_linear_4bit
    assert fastlora.dequantize_4bit is dequant.dequantize_4bit
