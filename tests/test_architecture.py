"""The package's form, checked: layers import only downward, no import cycle (function-level imports too),
no module over 400 lines, the core names no method, and built-in methods import only the author surface."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH, METHODS = ROOT / "bench", ROOT / "methods"
# Lowest first: a module may import its own layer and those before it (cycles within a layer fail below).
LAYERS = ["errors", "reduce", "models", "data", "measure", "report", "run", "regression", "api", "cli", "testing",
          "__init__", "__main__"]
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "api.py", "errors.py"}
SURFACE = {"tokenbench.reduce"}  # what a method's decisions may import
PUBLIC_API = {"tokenbench", "tokenbench.api"}  # what a plugin's command may import besides


def module_name(path: Path) -> str:
    root, package = (BENCH, "tokenbench") if path.is_relative_to(BENCH) else (METHODS, "tokenbench.methods")
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def modules_of(folder: Path) -> dict[str, Path]:
    return {module_name(p): p for p in folder.rglob("*.py")}


MODULES = modules_of(BENCH) | modules_of(METHODS)


def imports(path: Path) -> set[str]:
    """Every tokenbench module `path` imports, anywhere in it (`from a import b` counts a.b when b is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) ==
                   "TYPE_CHECKING" for stmt in block.body for n in ast.walk(stmt)}  # annotations, never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m == "tokenbench" or m.startswith("tokenbench.")}


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS.index(part)


def test_bench_has_no_loose_modules_and_none_over_400_lines():
    loose = {p.name for p in BENCH.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"modules outside a subpackage: {sorted(loose)}"
    long = {str(p.relative_to(ROOT)): n for p in [*BENCH.rglob("*.py"), *METHODS.rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_every_subpackage_and_entry_point_is_in_the_wheel():
    """The wheel holds exactly the packages pyproject lists: a package left out installs without its code (an
    editable install hides that), and then every command fails on its entry point."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for folder in (BENCH, METHODS) for p in folder.rglob("__init__.py")}
    assert on_disk == listed, f"missing from [tool.setuptools] packages: {sorted(on_disk - listed)}; " \
                              f"listed but absent: {sorted(listed - on_disk)}"
    assert set(project["tool"]["setuptools"]["package-data"]) <= listed
    targets = {v.split(":")[0] for group in project["project"]["entry-points"].values() for v in group.values()}
    unshipped = {t for t in targets if t not in listed and t.rpartition(".")[0] not in listed}
    assert not unshipped, f"entry points into modules the wheel does not hold: {sorted(unshipped)}"


def test_every_layer_imports_only_downward_and_the_core_names_no_method():
    upward = []
    for module, path in modules_of(BENCH).items():
        for target in imports(path):
            assert not target.startswith("tokenbench.methods"), f"{module} imports the method {target}"
            if target != "tokenbench" and layer(target) > layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_including_function_level_imports():
    graph = {m: {t for t in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A package imports its __init__ first: `from tokenbench.a.b import x` runs tokenbench.a too.
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_test_sees_upward_imports_and_cycles(tmp_path):
    assert "tokenbench.reduce.contract" in imports(BENCH / "reduce" / "vit.py")
    assert layer("tokenbench.cli.bench") > layer("tokenbench.run.sweep") > layer("tokenbench.reduce.vit")
    assert "tokenbench.methods.dvt.architecture" in imports(METHODS / "dvt" / "command.py")  # relative imports


@pytest.mark.parametrize("path", sorted(METHODS.rglob("*.py")), ids=lambda p: str(p.relative_to(METHODS)))
def test_built_in_methods_import_only_the_author_surface(path):
    name = module_name(path)
    command = path.name == "command.py" or name == "tokenbench.methods"  # a plugin command; the callable package
    allowed = SURFACE | (PUBLIC_API if command else set())
    outside = {t for t in imports(path) if not t.startswith("tokenbench.methods") and t not in allowed}
    assert not outside, f"{name} imports {sorted(outside)} (the author surface is tokenbench.reduce)"
