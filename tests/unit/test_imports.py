"""The package map holds: imports point launcher → training → sharding, no module imports
another's `_private` names, and no package's modules import each other in a circle.

Every .py under launcher/, training/ and sharding/ is parsed with `ast` (nothing is
imported); imports inside functions count for the direction and privacy checks, module-level
ones (not under `if TYPE_CHECKING:`) for the circle check, since only those run at import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("launcher", "training", "sharding")  # each may import only those after it
# training's sub-packages, lowest first: each may import only those before it (and
# training's top-level base modules below); the top-level wiring modules (trainer, plan)
# may import any of them.
TRAINING_LAYERS = ("run", "observe", "models", "parallel", "checkpoint", "evaluate", "loop")
TRAINING_BASE = (
    "training.config",
    "training.model_config",
    "training.model_registry",
    "training.typed",
    "training.errors",
    "training.schedule",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. launcher.launch
    target: str  # the imported module, e.g. training.run.rundir
    name: str | None  # the name taken from it (`from target import name`), else None
    line: int
    top_level: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str, path: Path, known: set[str]) -> list[Import]:
    found: list[Import] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module, a.name, None, node.lineno, top_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:  # `from training.run import rundir`: the module itself
                    found.append(Import(module, submodule, None, node.lineno, top_level))
                else:
                    found.append(Import(module, target, alias.name, node.lineno, top_level))
        inner = top_level and not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        if isinstance(node, ast.If) and _is_type_checking(node):
            inner = False
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _all_imports() -> list[Import]:
    modules = _modules()
    return [i for m, p in modules.items() for i in _imports(m, p, set(modules))]


def _package(module: str) -> str:
    return module.split(".")[0]


def _where(i: Import) -> str:
    return f"{i.module}:{i.line} imports {i.target}" + (f".{i.name}" if i.name else "")


def test_imports_point_launcher_to_training_to_sharding() -> None:
    wrong = [
        _where(i)
        for i in _all_imports()
        if _package(i.target) in PACKAGES
        and PACKAGES.index(_package(i.target)) < PACKAGES.index(_package(i.module))
    ]
    assert not wrong, "imports against launcher → training → sharding:\n" + "\n".join(wrong)


def _training_layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "training" and len(parts) > 2 else None


def test_training_sub_packages_import_only_lower_layers() -> None:
    wrong = []
    for i in _all_imports():
        source, target = _training_layer(i.module), _training_layer(i.target)
        if i.module in TRAINING_BASE and (target or _package(i.target) == "launcher"):
            wrong.append(_where(i))  # the base imports no sub-package
        if source is None or target is None or source == target:
            continue
        if TRAINING_LAYERS.index(target) > TRAINING_LAYERS.index(source):
            wrong.append(_where(i))
    assert not wrong, (
        f"imports against training's layers {' → '.join(reversed(TRAINING_LAYERS))}:\n"
        + "\n".join(wrong)
    )
    wiring = {_module_name(p) for p in (ROOT / "training").glob("*.py")} - set(TRAINING_BASE)
    assert all(i.target not in wiring for i in _all_imports() if _training_layer(i.module)), (
        "a sub-package imports a top-level wiring module of training"
    )
    assert {p.name for p in (ROOT / "training").iterdir() if (p / "__init__.py").is_file()} == set(
        TRAINING_LAYERS
    ), "a training sub-package is missing from TRAINING_LAYERS"


def _private(i: Import) -> bool:
    names = [*i.target.split("."), *([i.name] if i.name else [])]
    return any(n.startswith("_") and not n.endswith("__") for n in names)


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [
        _where(i)
        for i in _all_imports()
        if _package(i.target) in PACKAGES and i.target != i.module and _private(i)
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def test_find_cycle_reports_the_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_circle_within_a_package() -> None:
    graph: dict[str, set[str]] = {}
    for i in _all_imports():
        if i.top_level and i.target != i.module and _package(i.target) == _package(i.module):
            graph.setdefault(i.module, set()).add(i.target)
    for package in PACKAGES:
        sub = {m: t for m, t in graph.items() if _package(m) == package}
        cycle = find_cycle(sub)
        assert cycle is None, f"{package}: modules import each other: {' → '.join(cycle)}"


def test_the_checks_see_function_level_imports() -> None:
    """launcher.cli imports almost everything inside its command functions."""
    lazy = [i for i in _all_imports() if i.module == "launcher.cli" and not i.top_level]
    assert any(i.target == "training.trainer" for i in lazy)
