"""No import cycles between the project's modules (runtime/, export/, tools/), and the runtime's rooms
importing downward only, read with ``ast``.

Every ``import`` counts, those inside functions too (a lazy import hides a cycle, it does not
remove it). ``from P import x`` is an edge to ``P.x`` when that is a module, else to ``P``.
The parent packages Python initialises on the way (``import a.b`` runs ``a/__init__.py``) are
not edges: a package ``__init__`` that imports its own submodules is the ordinary layout, not a
circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "tools")

# Cycles allowed on purpose, as frozensets of module names, each with the reason. Empty: none is.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the project's packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a project module (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _base_of(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level, functions, branches)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(node, module, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else _resolve(base, modules))
    targets.discard(None)
    targets.discard(module)
    return targets  # type: ignore[return-value]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete circle a -> b -> ... -> a inside ``component`` (breadth-first, shortest)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle")  # unreachable for a real component


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each import cycle not in ALLOWED_CYCLES as ``a -> b -> a`` (empty: no cycle)."""
    return [" -> ".join(one_cycle(graph, c)) for c in strongly_connected(graph)
            if frozenset(c) not in ALLOWED_CYCLES]


def test_no_import_cycles_between_project_modules() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "runtime.pipeline" in graph  # the walk found the project
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_allowed_cycles_still_exist() -> None:
    """An allowance whose cycle has gone is stale and must be removed."""
    components = {frozenset(c) for c in strongly_connected(import_graph())}
    assert set(ALLOWED_CYCLES) <= components, set(ALLOWED_CYCLES) - components


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_detects_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """Negative control: a lazy (in-function) import that closes a circle is found."""
    _write(tmp_path, {
        "runtime/__init__.py": "",
        "runtime/a.py": "from runtime.b import f\n",
        "runtime/b.py": "def f():\n    from runtime import a\n    return a\n",
        "runtime/c.py": "import runtime.a\n",
        "export/__init__.py": "",
        "tools/__init__.py": "",
    })
    assert cycles(import_graph(tmp_path)) == ["runtime.a -> runtime.b -> runtime.a"]


def test_resolves_relative_and_package_imports(tmp_path: Path) -> None:
    """``from . import x``, ``from .x import y`` and ``import p.x`` resolve to the submodule."""
    _write(tmp_path, {
        "runtime/__init__.py": "",
        "runtime/pkg/__init__.py": "from . import leaf\n",
        "runtime/pkg/leaf.py": "from .other import g\n",
        "runtime/pkg/other.py": "import runtime.pkg.leaf as leaf\ndef g(): pass\n",
        "export/__init__.py": "",
        "tools/__init__.py": "",
    })
    graph = import_graph(tmp_path)
    assert graph["runtime.pkg"] == {"runtime.pkg.leaf"}
    assert graph["runtime.pkg.leaf"] == {"runtime.pkg.other"}
    assert cycles(graph) == ["runtime.pkg.leaf -> runtime.pkg.other -> runtime.pkg.leaf"]


# The runtime's rooms, lowest first (style: "sub-rooms import downward only"). A module may import
# its own level or a lower one. Level 0 is the numeric core at the top of runtime/ and the bundle
# it reads; runtime.pipeline composes the core, the strategies and the llm layer; the front ends
# (chat, prune, the assistant they share, and the server) compose everything.
RUNTIME_LEVELS: tuple[tuple[str, ...], ...] = (
    ("runtime", "runtime.bundle"),
    ("runtime.llm",),
    ("runtime.strategies",),
    ("runtime.pipeline",),
    ("runtime.anyres",),
    ("runtime.assistant", "runtime.chat", "runtime.prune", "runtime.serve", "runtime.turn"),
)


def runtime_level(module: str) -> int:
    """The level of a runtime module: that of the longest room prefix naming it."""
    best, level = -1, -1
    for index, rooms in enumerate(RUNTIME_LEVELS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and len(room) > best:
                best, level = len(room), index
    return level


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each ``a -> b`` between runtime modules where b sits on a higher level than a."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith("runtime")
                  for b in targets if b.startswith("runtime") and runtime_level(b) > runtime_level(a))


def test_runtime_rooms_import_downward_only() -> None:
    graph = import_graph()
    assert {"runtime.llm.context", "runtime.anyres.pipeline", "runtime.serve.app"} <= set(graph)
    found = upward_imports(graph)
    assert not found, "lower runtime rooms importing higher ones:\n" + "\n".join(found)


def test_every_runtime_room_has_a_level() -> None:
    """A new sub-room must be placed in RUNTIME_LEVELS, not fall into the core by its prefix."""
    rooms = {path.parent for path in (ROOT / "runtime").rglob("__init__.py")} - {ROOT / "runtime"}
    named = {room for rooms in RUNTIME_LEVELS for room in rooms}
    unplaced = {".".join(room.relative_to(ROOT).parts) for room in rooms} - named
    assert not unplaced, f"runtime rooms without a level: {sorted(unplaced)}"


def test_detects_an_upward_import(tmp_path: Path) -> None:
    """Negative control: the llama.cpp layer importing LLaVA-NeXT's pipeline is an upward import."""
    _write(tmp_path, {
        "runtime/__init__.py": "",
        "runtime/errors.py": "",
        "runtime/llm/__init__.py": "",
        "runtime/llm/context.py": "from runtime.errors import *\nfrom runtime.anyres.pipeline import X\n",
        "runtime/anyres/__init__.py": "",
        "runtime/anyres/pipeline.py": "import runtime.llm.context\nX = 1\n",
        "export/__init__.py": "",
        "tools/__init__.py": "",
    })
    assert upward_imports(import_graph(tmp_path)) == ["runtime.llm.context -> runtime.anyres.pipeline"]
