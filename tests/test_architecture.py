"""The layering rules of docs/architecture.md, checked on the package's source.

Every ``import`` statement of every module is read with :mod:`ast` (module-level, nested and
``TYPE_CHECKING`` ones alike, except where a rule says otherwise), resolved to an absolute
module name, and held against the rules.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "backbeat_trio"
ASYNCIO_WORLD = ("asyncio", "nats", "trio_asyncio")
MAX_LINES = 620


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, *, runtime_only: bool = False) -> Iterator[str]:
    """Absolute names of what module ``name`` imports (``from a import b`` gives ``a.b`` when that
    is a module of the package, else ``a``)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = name if _is_package(path) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in MODULES else target


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(rule: str, ok: object) -> list[str]:
    assert callable(ok)
    return [
        f"{name} imports {target} ({rule})"
        for name in MODULES
        for target in _imports(name)
        if not ok(name, target)
    ]


def test_only_the_bridge_touches_asyncio_and_nats_py() -> None:
    def ok(name: str, target: str) -> bool:
        return target.split(".")[0] not in ASYNCIO_WORLD or _layer(name) == "_bridge"

    assert not _violations("asyncio world outside _bridge", ok)


def test_the_cores_are_sans_io_and_import_nothing_above_them() -> None:
    allowed = ("backbeat_trio._core", "backbeat_trio._errors", "backbeat_trio._version")
    io_modules = ("trio", "socket", "subprocess", "os", "pathlib", "ssl", *ASYNCIO_WORLD)

    def ok(name: str, target: str) -> bool:
        if _layer(name) != "_core":
            return True
        if target.startswith("backbeat_trio"):
            return target.startswith(allowed)
        return target.split(".")[0] not in io_modules or name == "backbeat_trio._core.signing"

    # signing reads and writes key files (os, pathlib): the one core with file I/O, kept beside
    # the keyring it loads
    assert not _violations("a sans-IO core importing I/O or a layer above", ok)


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        (
            "_transport",
            ("_bridge", "_client", "_services", "_ops", "_cli", "testing", "_embedded"),
        ),
        ("_util", ("_bridge", "_client", "_services", "_ops", "_cli", "testing", "_embedded")),
        ("_bridge", ("_client", "_services", "_ops", "_cli", "testing", "_embedded")),
        ("_client", ("_services", "_ops", "_cli", "testing", "_embedded")),
        ("_services", ("_ops", "_cli", "testing", "_embedded")),
        ("_ops", ("_cli", "testing", "_embedded")),
        ("testing", ("_ops", "_cli", "_embedded")),
    ],
)
def test_imports_point_down_the_layers(layer: str, forbidden: tuple[str, ...]) -> None:
    def ok(name: str, target: str) -> bool:
        if _layer(name) != layer or not target.startswith("backbeat_trio."):
            return True
        return _layer(target) not in forbidden

    assert not _violations(f"{layer} must not import {forbidden}", ok)


def test_client_and_services_enter_the_bridge_only_through_open_nats_transport() -> None:
    pattern = re.compile(r"from \.\._bridge[.\w]* import (.+)")
    seen = []
    for name, path in MODULES.items():
        if _layer(name) in ("_client", "_services"):
            seen += [m.group(1).strip() for m in pattern.finditer(path.read_text())]
    assert seen, "the services must open their connections somewhere"
    assert set(seen) == {"open_nats_transport"}


def test_nothing_in_the_library_imports_the_cli_or_rich() -> None:
    def ok(name: str, target: str) -> bool:
        if _layer(name) == "_cli" or name == "backbeat_trio.__main__":
            return True
        return _layer(target) != "_cli" and target.split(".")[0] != "rich"

    assert not _violations("the library reaching the CLI", ok)


def test_the_ops_dependencies_stay_in_ops_and_load_lazily() -> None:
    ops_deps = ("hypercorn", "prometheus_client")

    def ok(name: str, target: str) -> bool:
        return target.split(".")[0] not in ops_deps or _layer(name) == "_ops"

    assert not _violations("hypercorn/prometheus_client outside _ops", ok)
    # the package front and _ops/__init__ load them only when an entry point is called
    for front in ("backbeat_trio", "backbeat_trio._ops"):
        eager = [t for t in _imports(front, runtime_only=True) if t.split(".")[0] in ops_deps]
        assert not eager, (front, eager)
        assert not [
            t
            for t in _imports(front, runtime_only=True)
            if t.startswith("backbeat_trio._ops.") and t != "backbeat_trio._ops"
        ], front


def test_nats_py_private_names_are_read_in_one_gated_module() -> None:
    # nats-py's client and subscriptions go by `nc`/`_nc` and `nsub` throughout the bridge
    private_access = re.compile(r"\b(?:_?nc|nsub)\._[a-z]\w*")
    offenders = [
        f"{name}: {match.group(0)}"
        for name, path in MODULES.items()
        if name != "backbeat_trio._bridge._natspy_private"
        for match in private_access.finditer(path.read_text())
    ]
    assert not offenders
    users = {name for name in MODULES for t in _imports(name) if t.endswith("._natspy_private")}
    assert users
    assert all(_layer(u) == "_bridge" for u in users), users


def test_trio_private_names_and_protocol_are_used_in_one_gated_module() -> None:
    # trio's private modules (trio._core...) are imported nowhere; the run-loop message a
    # channel reuses is taken in _util/_trio_private.py, behind fast_wait_enabled()
    gate = "backbeat_trio._util._trio_private"
    importers = {name for name in MODULES for t in _imports(name) if re.match(r"trio\._", t)}
    assert not importers, importers
    text = {name: path.read_text() for name, path in MODULES.items()}
    assert not [n for n, t in text.items() if "WaitTaskRescheduled" in t and n != gate]
    assert "fast_wait_enabled()" in text[gate]
    users = {name for name in MODULES for t in _imports(name) if t == gate}
    assert users == {"backbeat_trio._util.channel"}, users


def test_nats_py_errors_are_caught_at_one_edge() -> None:
    # Only _bridge/errors.py names nats-py's exceptions in an `except` or catches every
    # Exception in the bridge; the rest of the bridge maps (map_nats_errors), ignores with a
    # reason (ignore_nats_errors) or decides on the lists that module keeps (nats_failures()...)
    edge = "backbeat_trio._bridge.errors"
    caught_at: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ExceptHandler):
                continue
            names = (
                {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                if node.type
                else {""}
            )
            broad = _layer(name) == "_bridge" and bool(names & {"", "Exception", "BaseException"})
            if "nats" in names or broad:
                text = ast.unparse(node.type) if node.type else ""
                caught_at.setdefault(name, []).append(f"{node.lineno}: except {text}")
    assert caught_at.pop(edge), "the edge itself maps what nats-py raises"
    assert not caught_at


def test_no_import_cycles_at_run_time() -> None:
    graph = {
        name: {t for t in _imports(name, runtime_only=True) if t in MODULES and t != name}
        for name in MODULES
    }
    # a package importing its own submodules (its front) is not a cycle between layers
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles


def test_no_module_grows_past_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}
