"""The package's shape, checked over the WHOLE package (every import counts: top-level, lazy, ``if TYPE_CHECKING``).

* no import cycle between modules, and none between sub-packages (the drawing in docs/architecture.md);
* every sub-package imports only what docs/architecture.md's table says it may (so nothing points back up, and
  nothing below ``trainer/`` imports it);
* no stage imports another stage except the one it extends;
* every stage is run as ``Engine(stage).run()`` from outside: only the launcher builds an engine;
* every ``cmw_transfer`` import in the repository (package, scripts, tests, docs' snippets aside) names a module
  and a name that exist, so a move cannot leave a script or a test pointing at an old path;
* no module over 400 lines; no function in ``trainer/`` over 60 lines or 10 parameters without a one-line
  ``Size:`` reason in its docstring.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "cmw_transfer"
DOC = REPO / "docs" / "architecture.md"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 10
LAUNCHER = "cmw_transfer.trainer.engine.launch"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"))


def _absolute(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = name.split(".") if modules()[name].name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports(name: str) -> frozenset[str]:
    """The package's modules ``name`` imports anywhere in its source (functions and TYPE_CHECKING blocks too)."""
    known, found = modules(), set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, node)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return frozenset(m for m in found if m in known and m != name)


def unit(name: str) -> str:
    """The sub-package a module belongs to: ``cmw_transfer.X`` (``cmw_transfer.trainer.X`` inside ``trainer/``)."""
    parts = name.split(".")
    depth = 3 if parts[1:2] == ["trainer"] and len(parts) > 2 else 2
    return ".".join(parts[:depth])


def find_cycle(graph: dict[str, frozenset[str] | set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if not state.get(nxt):
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if not state.get(node):
            found = visit(node)
            if found:
                return found
    return None


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in modules():
        graph.setdefault(unit(name), set()).update(unit(m) for m in imports(name) if unit(m) != unit(name))
    return graph


def _dotted(doc_name: str) -> str:
    """``trainer/engine/`` -> ``cmw_transfer.trainer.engine``; ``__init__.py`` -> ``cmw_transfer``."""
    name = "cmw_transfer." + doc_name.strip("/").removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def documented_imports() -> dict[str, set[str]]:
    """The table of docs/architecture.md under the header ``| sub-package | may import |`` (``-``: nothing)."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index("| sub-package | may import |") + 2
    table = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        name, allowed = (cell.strip() for cell in line.strip("|").split("|"))
        table[_dotted(name.strip("`"))] = {_dotted(a) for a in re.findall(r"`([\w./]+)`", allowed)}
    return table


# -- the import graph -------------------------------------------------------------------------------------------
def test_no_import_cycle_between_modules():
    cycle = find_cycle({m: imports(m) for m in modules()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_sub_packages():
    cycle = find_cycle(unit_graph())
    assert cycle is None, "import cycle between sub-packages: " + " -> ".join(cycle or [])


def test_sub_packages_import_only_what_the_architecture_doc_allows():
    allowed = documented_imports()
    graph = unit_graph()
    assert set(graph) <= set(allowed), f"sub-packages missing from docs/architecture.md: {set(graph) - set(allowed)}"
    for name, uses in graph.items():
        extra = uses - allowed[name]
        assert not extra, f"{name} imports {sorted(extra)}, which docs/architecture.md does not allow"
    assert find_cycle(allowed) is None  # the documented drawing itself has no circle


def test_nothing_below_trainer_imports_it():
    above = ("cmw_transfer.trainer", "cmw_transfer.cli", "cmw_transfer.__main__")
    for name in modules():
        if name.startswith(above):
            continue
        up = sorted(m for m in imports(name) if m.startswith(above))
        assert not up, f"{name} imports {up}"


# -- stages -----------------------------------------------------------------------------------------------------
def _decorator_name(node: ast.expr) -> str:
    call = node.func if isinstance(node, ast.Call) else node
    return call.id if isinstance(call, ast.Name) else getattr(call, "attr", "")


@cache
def stages() -> dict[str, list[ast.ClassDef]]:
    """Modules defining a registered stage (``@register_trainer``) -> those classes."""
    found: dict[str, list[ast.ClassDef]] = {}
    for name in modules():
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.ClassDef) and any(_decorator_name(d) == "register_trainer"
                                                      for d in node.decorator_list):
                found.setdefault(name, []).append(node)
    return found


def _home_of(name: str, symbol: str) -> str | None:
    """The module ``symbol`` is imported from in module ``name`` (or ``name`` itself when defined there)."""
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == symbol for a in node.names):
            return _absolute(name, node)
    return name


def test_the_built_in_stages_are_found():
    names = {cls.name for classes in stages().values() for cls in classes}
    assert names >= {"ERMTrainer", "OLTRTrainer", "MetaTrainer", "AdvisorTrainer", "ProbeTrainer",
                     "CurveNetTrainer"}, names


def test_no_stage_imports_another_stage_except_the_one_it_extends():
    stage_modules = set(stages())
    for name, classes in stages().items():
        extends = {_home_of(name, base.id) for cls in classes for base in cls.bases if isinstance(base, ast.Name)}
        reached = imports(name) & stage_modules
        assert reached <= extends, f"{name} imports the stage module(s) {sorted(reached - extends)}"
    for name in modules():  # and nothing that is not a stage imports one (the registry finds them by name)
        if name not in stage_modules and name != "cmw_transfer.trainer.engine.registry":
            assert not imports(name) & stage_modules, f"{name} imports {sorted(imports(name) & stage_modules)}"


def test_only_the_launcher_builds_an_engine():
    builders = sorted(name for name in modules() for node in ast.walk(tree(name))
                      if isinstance(node, ast.Call) and _decorator_name(node) == "Engine")
    assert builders == [LAUNCHER], builders


# -- sizes ------------------------------------------------------------------------------------------------------
def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def _size_reason(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    doc = ast.get_docstring(node) or ""
    return any(line.strip().startswith("Size: ") and len(line.strip()) > len("Size: ") + 10
               for line in doc.splitlines())


def test_trainer_functions_are_short_and_narrow_or_say_why():
    offenders = []
    for name in modules():
        if not name.startswith("cmw_transfer.trainer"):
            continue
        for node in ast.walk(tree(name)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
            count = len([a for a in params if a.arg not in ("self", "cls")])
            lines = node.end_lineno - node.lineno + 1
            if (lines > MAX_FUNCTION_LINES or count > MAX_PARAMETERS) and not _size_reason(node):
                offenders.append(f"{name}.{node.name}: {lines} lines, {count} parameters")
    assert not offenders, "\n".join(offenders)


def unresolved_imports(path: Path) -> list[str]:
    """``module.name`` of every absolute ``cmw_transfer`` import in ``path`` that does not resolve."""
    import importlib

    missing, where = [], path.relative_to(REPO) if path.is_relative_to(REPO) else path
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names if a.name.startswith("cmw_transfer")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cmw_transfer"):
            targets = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in targets:
            try:
                found = importlib.import_module(module)
            except ImportError:
                missing.append(f"{where}:{node.lineno}: {module}")
                continue
            if name not in (None, "*") and not hasattr(found, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{where}:{node.lineno}: {module}.{name}")
    return missing


def test_every_import_of_the_package_in_the_repository_resolves():
    files = [p for folder in ("cmw_transfer", "scripts", "tests", "pretrained") for p in (REPO / folder).rglob("*.py")]
    missing = [m for path in sorted(files) for m in unresolved_imports(path)]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("rule", ["cycle", "upward", "size", "resolve"])
def test_the_checks_catch_what_they_are_for(rule, tmp_path):
    """The helpers above find what they must (a check that cannot fail is no check)."""
    if rule == "cycle":
        assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
        assert find_cycle({"a": {"b"}, "b": set()}) is None
    elif rule == "upward":
        assert unit("cmw_transfer.trainer.apply.erm") == "cmw_transfer.trainer.apply"
        assert unit("cmw_transfer.weighting.cmw") == "cmw_transfer.weighting"
        assert unit("cmw_transfer.trainer") == "cmw_transfer.trainer"
        assert _dotted("trainer/engine/") == "cmw_transfer.trainer.engine"
        assert _dotted("__init__.py") == "cmw_transfer" and _dotted("trainer/__init__.py") == "cmw_transfer.trainer"
    elif rule == "resolve":
        probe = tmp_path / "probe.py"
        probe.write_text("from cmw_transfer.trainer.common import make_loader\nimport cmw_transfer.trainer.nope\n"
                         "from cmw_transfer.weighting import CMWLoss, NoSuchName\n")
        assert [m.split(": ")[1] for m in unresolved_imports(probe)] == [
            "cmw_transfer.trainer.common", "cmw_transfer.trainer.nope", "cmw_transfer.weighting.NoSuchName"]
    else:
        fn = ast.parse('def f(a, b):\n    """Size: the reason is written here."""\n').body[0]
        assert _size_reason(fn)
        assert not _size_reason(ast.parse("def f():\n    pass\n").body[0])
