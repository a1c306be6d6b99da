"""The layering of shared/STYLE.md, checked on the imports of every module.

Layers, each importing only those above it::

    1. errors (no project imports), options   options: errors only
    2. wire (sans-I/O framing),                layer 1; no asyncio, no sockets
       devices (device-map rules),
       handshake (sans-I/O authentication),
       shm (sans-I/O shared-memory segments)
    3. codec (messages <-> header + buffers)   layers 1-2; no asyncio
    4. autograd                                layers 1-3; not the transports,
                                               not the agent (it talks to peers
                                               through an interface it is given)
    5. transport (asyncio protocols)           layers 1-2: it moves frames and
                                               knows nothing of messages
    6. agent (and rref, autograd_service,     anything but the api layer
       tracing)
    7. api and the other public entry modules  ``__init__`` only re-exports
       (dist_autograd, optim, nn, testing,
       profiler)
    8. sync (the synchronous facade)           anything; nothing else in the
                                               package imports it

To extend: add a row to ``RULES`` (a module path relative to the package, or
a package prefix such as ``"autograd"``, which also covers ``autograd.*``). A
module without a row may import any project module except ``api``. Every
import counts, including those inside functions or ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aiorpc_autograd

PACKAGE = "aiorpc_autograd"
ROOT = Path(aiorpc_autograd.__file__).parent
ANY = None  # no restriction besides the api rule

# module -> the project modules it may import (top-level names: "autograd"
# stands for the autograd module or package and everything in it).
RULES: dict[str, frozenset[str] | None] = {
    "errors": frozenset(),
    "options": frozenset({"errors"}),
    "wire": frozenset({"errors"}),
    "handshake": frozenset({"errors"}),
    "devices": frozenset(),
    "codec": frozenset({"errors", "options", "wire", "devices"}),
    "autograd": frozenset({"errors", "options", "wire", "devices", "codec", "autograd"}),
    "shm": frozenset({"errors"}),
    "transport": frozenset({"errors", "options", "wire", "handshake", "shm"}),
    "rendezvous": frozenset({"errors", "options"}),
    "agent": ANY,
    "api": ANY,
    "__init__": ANY,
}

# Only the api layer itself may import the api module: ``__init__`` (which
# re-exports it) and the other public entry modules (``dist_autograd`` and
# ``optim`` of API.md, ``nn`` for RemoteModule, ``testing`` for fault
# injection, ``profiler`` for the group timeline), which are built on the
# public calls and find the current agent through it. Nothing below the api
# layer may. A new public entry module goes here.
API_IMPORTERS = frozenset(
    {"__init__", "api", "dist_autograd", "optim", "nn", "profiler", "sync", "testing"}
)

# The synchronous facade sits above the api layer: only its own modules import it.
TOP_LAYER = "sync"

# Third-party / stdlib modules a module must not import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "errors": frozenset({"asyncio", "uvloop", "socket", "selectors", "torch", "msgpack"}),
    "options": frozenset({"asyncio", "uvloop", "socket", "selectors", "torch", "msgpack"}),
    # The frame layer is pure bytes: no I/O, no event loop, no knowledge of
    # what the (msgpack) header or the (tensor) buffers hold.
    "wire": frozenset({"asyncio", "uvloop", "socket", "selectors", "ssl", "torch", "msgpack"}),
    "handshake": frozenset({"asyncio", "uvloop", "socket", "selectors", "torch", "msgpack"}),
    "shm": frozenset({"asyncio", "uvloop", "socket", "selectors", "msgpack"}),
    "codec": frozenset({"asyncio", "uvloop", "socket", "selectors", "ssl"}),
    "devices": frozenset({"asyncio", "uvloop", "socket", "selectors", "ssl", "msgpack"}),
}


def module_name(path: Path) -> str:
    """``aiorpc_autograd/autograd/engine.py`` -> ``autograd.engine``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return name == "__init__" or (ROOT / name.replace(".", "/") / "__init__.py").exists()


def resolve(name: str, node: ast.ImportFrom) -> list[str]:
    """The project modules (relative dotted names) a ``from`` import names."""
    if node.level:
        # The package the importing module lives in.
        base = [] if name == "__init__" else name.split(".")
        if not is_package(name):
            base = base[:-1]
        up = node.level - 1
        if up > len(base):
            raise AssertionError(f"{name}: relative import beyond the package")
        base = base[: len(base) - up]
        module = [*base, *(node.module.split(".") if node.module else [])]
    elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
        module = node.module.split(".")[1:]
    else:
        return []
    found = []
    for alias in node.names:
        sub = ".".join([*module, alias.name])
        if (ROOT / (sub.replace(".", "/") + ".py")).exists() or (
            ROOT / sub.replace(".", "/") / "__init__.py"
        ).exists():
            found.append(sub)  # ``from . import codec``: the module itself
        else:
            found.append(".".join(module) or "__init__")
    return found


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(project modules, other top-level modules) that ``path`` imports."""
    name = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    project: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    project.add(".".join(alias.name.split(".")[1:]) or "__init__")
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            found = resolve(name, node)
            if found:
                project.update(found)
            elif node.module and not node.level:
                external.add(node.module.split(".")[0])
    external.discard("__future__")
    return project, external


def rule_for(name: str) -> tuple[str | None, frozenset[str] | None]:
    """The most specific row of RULES covering module ``name``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in RULES:
            return key, RULES[key]
    return None, ANY


def top(name: str) -> str:
    return name.split(".")[0]


MODULES = sorted(ROOT.rglob("*.py"))


def test_the_walk_sees_the_known_imports() -> None:
    """Guard against a vacuous pass: the collector finds what is plainly there."""
    assert {module_name(p) for p in MODULES} >= {"errors", "wire", "codec", "agent", "__init__"}
    project, external = imports(ROOT / "codec.py")
    assert {"errors", "wire"} <= project
    assert {"torch", "msgpack"} <= external
    project, _ = imports(ROOT / "__init__.py")
    assert {"api", "errors", "options"} <= project
    project, _ = imports(ROOT / "sync" / "rpc" / "api.py")
    assert {"api", "rref", "sync._bridge"} <= project
    agent_project, agent_external = imports(ROOT / "agent.py")
    assert "codec" in agent_project and "asyncio" in agent_external


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_imports_only_layers_above_it(path: Path) -> None:
    name = module_name(path)
    project, _ = imports(path)
    project.discard(name)
    row, allowed = rule_for(name)
    if allowed is not None:
        # A module may import its own package's submodules (autograd.x -> autograd.y).
        bad = sorted(m for m in project if top(m) not in allowed and top(m) != top(name))
        assert not bad, f"{name} (rule {row!r}) may import only {sorted(allowed)}, not {bad}"
    if top(name) not in API_IMPORTERS:
        assert "api" not in {top(m) for m in project}, (
            f"{name} imports the api module: only {sorted(API_IMPORTERS)} may"
        )
    if top(name) != TOP_LAYER:
        assert TOP_LAYER not in {top(m) for m in project}, (
            f"{name} imports the {TOP_LAYER} facade, which sits above every other module"
        )


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_avoids_forbidden_dependencies(path: Path) -> None:
    name = module_name(path)
    _, external = imports(path)
    forbidden = FORBIDDEN.get(top(name), frozenset())
    assert not external & forbidden, f"{name} must not import {sorted(external & forbidden)}"


def test_init_only_re_exports() -> None:
    """``__init__`` holds imports, ``__all__`` and ``__version__``: no logic."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            assert names <= {"__all__", "__version__"}, names
            continue
        raise AssertionError(f"__init__.py line {node.lineno}: {type(node).__name__}")


def test_rules_name_real_modules() -> None:
    """A row for a module that does not exist is fine (it is waiting for it),
    but the modules a row allows must be ones the layering knows."""
    known = set(RULES)
    for row, allowed in RULES.items():
        if allowed is not None:
            assert allowed <= known, f"{row}: {sorted(allowed - known)}"
