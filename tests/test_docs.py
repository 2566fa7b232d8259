"""The documentation: the site builds without a warning, its examples run, and every code name it
gives still names code.

What counts as a code name, in ``docs/*.md`` and ``README.md`` (inline code spans, MyST roles,
and the Python examples) and in every docstring of the package (reST roles and ``literals``):

* a cross-reference role (``:func:``, ``:class:``, ``:meth:``, ``:attr:``, ``:exc:``,
  ``:mod:``, ``:data:``, ``:obj:``; in Markdown ``{class}`` and the like): always;
* a path into the package (``_core/intake.py``, ``backbeat_trio/_core/edge.py``, or a member
  of it, ``_bridge/jetstream.py::translate_error``) or into the repository (``tests/…``,
  ``benchmarks/…``, ``examples/…``, ``docs/…``): the file must exist, the member must too;
* a dotted name (``Client.emit_status``, ``bb3.Config``, ``backbeat_trio._core.wire.encode``,
  ``health().errors``), optionally called with keywords (``Config(jetstream=True)``): its root
  must be the package, ``bb3``, a module path of the package (``_core.wire``), a public name,
  a name defined once at the top of a package module, a name the docstring's own module or class
  sees, one of the instance names in ``INSTANCE_NAMES`` (``bb``, ``cluster``, ``metrics``, …), or
  a module in ``OUTSIDE_MODULES``; then every attribute along the way must exist (a class's
  methods, properties, fields and the attributes its ``__init__`` sets), and every keyword must be
  a parameter. A root that begins with ``_`` and is none of these is a module alias the layout
  no longer has (``_reverb._HAReports``) and fails; other unknown roots are prose
  (``keys.toml``, ``nats.go``) and are not checked;
* a bare name that looks like code: ``_private`` names, ``UPPER_CASE`` constants (but not
  ``BACKBEAT_*``: environment variables and stream names), ``CamelCase`` names, ``snake_case``
  names (``replay_bars``, ``beats_left``) and ``function()`` calls: each must be defined
  in the package (as a name, an attribute, a parameter or a string) or in the tests, the
  benchmarks or the noxfile (as a function, a class or an assigned name), be a builtin, or be
  listed in
  ``OUTSIDE_NAMES`` (trio's, nats-py's, nats-server's and the Go SDK's names the docs mention).

Prose, not checked: single lower-case words (``health``, values such as ``"plan"``), a logger's
name (``backbeat_trio.admin``), the rest of a name after a ``/``
(``BACKBEAT_TLS_CA``/``_KEY``) and NATS's ``_INBOX`` subjects.
``PENDING`` lists stale names in files whose owners have yet to fix them; an entry that no longer
occurs must be removed.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import backbeat_trio
import backbeat_trio.testing

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "backbeat_trio"
DOCS = ROOT / "docs"

# --- the build -----------------------------------------------------------------------------------


def _sphinx(builder: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, "docs", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    done = _sphinx("html", tmp_path / "html")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "WARNING" not in done.stderr, done.stderr
    pages = {p.stem for p in (tmp_path / "html").glob("*.html")}
    assert {"index", "tutorial", "howto", "api", "protocol", "changelog"} <= pages
    api = (tmp_path / "html" / "api.html").read_text()
    assert 'id="backbeat_trio.open_client"' in api


def test_the_examples_in_the_pages_pass_as_doctests(tmp_path: Path) -> None:
    done = _sphinx("doctest", tmp_path / "doctest")
    assert done.returncode == 0, done.stderr + done.stdout
    output = (tmp_path / "doctest" / "output.txt").read_text()
    tested = sum(int(n) for n in re.findall(r"^\s*(\d+) tests?\b", output, re.MULTILINE))
    assert tested >= 20, output  # the protocol's and the how-to's examples did run
    assert "0 failures in tests" in output, output


def _api_names() -> set[str]:
    names: set[str] = set()
    module = ""
    for line in (DOCS / "api.md").read_text().splitlines():
        if m := re.match(r"\.\. currentmodule:: (\S+)", line.strip()):
            module = m.group(1)
        elif m := re.match(r"\.\. auto(?:function|class|exception|data):: (\S+)", line.strip()):
            names.add(f"{module}.{m.group(1)}")
    return names


def test_every_exported_name_is_in_the_api_reference() -> None:
    exported = {f"backbeat_trio.{n}" for n in backbeat_trio.__all__} | {
        f"backbeat_trio.testing.{n}" for n in backbeat_trio.testing.__all__
    }
    documented = _api_names()
    assert not exported - documented, f"missing from docs/api.md: {sorted(exported - documented)}"
    assert not documented - exported, f"not exported: {sorted(documented - exported)}"


# --- the examples that are whole files -----------------------------------------------------------


def _example_files() -> dict[str, str]:
    """Code blocks whose first line is ``# file: NAME``, by name (tutorial and how-to pages)."""
    files: dict[str, str] = {}
    for page in [DOCS / "tutorial.md", *sorted(DOCS.glob("howto*.md"))]:
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M):
            if m := re.match(r"# file: (\S+)\n", block):
                assert m.group(1) not in files, f"{page.name}: two blocks are {m.group(1)}"
                files[m.group(1)] = block
    return files


def test_the_tutorial_and_how_to_tests_pass(tmp_path: Path) -> None:
    files = _example_files()
    assert {"my_agent.py", "test_my_agent.py", "main.py", "services.py"} <= set(files)
    for name, code in files.items():
        (tmp_path / name).write_text(code)
        compile(code, name, "exec")
    tests = sorted(n for n in files if n.startswith("test_"))
    pytest_args = ["-q", "-p", "no:cacheprovider", "-o", "trio_mode=true", "-W", "error"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args, *tests],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"\b{len(_count_tests(files))} passed\b", done.stdout), done.stdout


def _count_tests(files: dict[str, str]) -> list[str]:
    return [t for n, code in files.items() if n.startswith("test_") for t in _test_names(code)]


def _test_names(code: str) -> list[str]:
    return re.findall(r"^async def (test_\w+)|^def (test_\w+)", code, re.M)


@pytest.mark.nats
def test_the_services_how_to_runs_a_cluster_in_one_program(tmp_path: Path) -> None:
    (tmp_path / "services.py").write_text(_example_files()["services.py"])
    done = subprocess.run(
        [sys.executable, "-W", "error", "services.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"admin API on http://127\.0\.0\.1:\d+/", done.stdout), done.stdout
    assert "{'executing': 3, 'done': 3}, []" in done.stdout, done.stdout


# --- code names ----------------------------------------------------------------------------------

#: Instance names the docs use for the objects the API hands out.
INSTANCE_NAMES: dict[str, str] = {
    "bb": "backbeat_trio.Client",
    "client": "backbeat_trio.Client",
    "cluster": "backbeat_trio.testing.FakeCluster",
    "metrics": "backbeat_trio.ClientMetrics",
    "health()": "backbeat_trio.HealthStatus",
    "frame": "backbeat_trio.BeatFrame",
    "claim": "backbeat_trio.StatusClaim",
    "report": "backbeat_trio.BarReport",
    "cfg": "backbeat_trio.Config",
    "conn": "backbeat_trio.NatsTransport",
    "transport": "backbeat_trio._transport.base.Transport",
    "reverb": "backbeat_trio.ReverbStatus",
    "pulse": "backbeat_trio.PulseStatus",
}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Modules outside the package whose names the docs give; resolved like our own.
OUTSIDE_MODULES = _words(
    "trio trio_asyncio msgspec nats nacl hypercorn prometheus_client pytest hypothesis asyncio "
    "os sys time "
    "json hashlib functools contextlib warnings math datetime collections typing signal socket "
    "ssl tomllib base64 logging gc weakref dataclasses inspect subprocess pathlib re"
)

#: Bare names from outside the package that the docs and docstrings mention.
OUTSIDE_NAMES = _words(
    # trio and pytest-trio
    "MockClock CancelScope TaskStatus MemoryReceiveChannel MemorySendChannel WouldBlock "
    "EndOfChannel send_nowait current_loop open_websocket map_exceptions "
    "TASK_STATUS_IGNORED autojump_clock move_on_after fail_after current_time sleep_until "
    "open_nursery start_soon nursery_start "
    # nats-py, nats-server, JetStream
    "SlowConsumerError PubAck PubAcks NoRespondersError TimeoutError ConnectionClosedError "
    "KeyValue StreamConfig _send_command _send_publish pending_size "
    # nats-server's configuration
    "max_payload max_connections max_subscriptions allow_responses sync_interval "
    "ports_file_dir dont_randomize "
    # the Go SDK and the protocol's prose
    "WithBeatBudget HealthStatus LegacyBeatInfo BeatFrame StatusClaim BarReport TempoChange "
    # the standard library, msgspec and the asyncio world
    "ExceptionGroup BaseExceptionGroup RecursionError MemoryError DeprecationWarning "
    "CancelledError ValidationError DecodeError AbstractEventLoop TypeError ValueError "
    "KeyboardInterrupt SystemExit RuntimeError sha256 asdict "
    # web: hypercorn and ASGI, Prometheus, Kubernetes
    "GaugeMetricFamily CounterMetricFamily CollectorRegistry ConfigMap secretKeyRef "
    # prometheus-client's process and platform collectors
    "python_info process_cpu_seconds_total process_resident_memory_bytes process_open_fds "
    "process_max_fds process_start_time_seconds process_virtual_memory_bytes "
    "python_gc_objects_collected_total python_gc_collections_total "
    "python_gc_objects_uncollectable_total "
    "ServiceMonitor PodMonitor "
    # the variables of the HA proofs in docs/scale.md
    "next_i send_time"
)

#: Stale names in files whose owners are changing them now: (file, name) -> what to write instead.
PENDING: dict[tuple[str, str], str] = {}


class Span(NamedTuple):
    source: str  # file:line
    text: str
    role: bool  # a cross-reference role: always a code name
    module: str | None = None  # the docstring's module (None in Markdown)
    owner: str | None = None  # the docstring's class, dotted from the module
    params: dict[str, str] | None = None  # the documented function's annotated parameters
    suffix: bool = False  # right after a "/": the rest of a name (``BACKBEAT_TLS_CA``/``_KEY``)


_ROLE_MD = re.compile(r"\{(?:py:)?(func|class|meth|attr|exc|mod|data|obj)\}`([^`]+)`")
_ROLE_RST = re.compile(r":(?:py:)?(func|class|meth|attr|exc|mod|data|obj):`([^`]+)`")
_CODE_MD = re.compile(r"(?<![`\w])`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")
_LITERAL_RST = re.compile(r"``([^`]+?)``")
_FENCE = re.compile(r"^(```+|~~~+)(.*)$")
_PY_NAME = re.compile(r"\b(bb3|backbeat_trio)((?:\.[A-Za-z_]\w*)+)")
_PY_FROM = re.compile(r"^\s*from (backbeat_trio[\w.]*) import \(?([\w, \n]+)\)?", re.M)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _after_slash(text: str, offset: int) -> bool:
    return text[:offset].rstrip("`").rstrip().endswith("/")


def _markdown_spans(path: Path) -> Iterator[Span]:
    text = path.read_text()
    name = path.relative_to(ROOT).as_posix()
    prose: list[str] = []
    fence: str | None = None
    code_start = 0
    code: list[str] = []
    lang = ""
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        m = _FENCE.match(line.strip())
        if fence is None and m:
            fence, lang, code, code_start = m.group(1), m.group(2).strip(), [], number
            prose.append("\n")
            continue
        if fence is not None:
            if line.strip() == fence:
                if lang in ("python", "{doctest}", "pycon"):
                    yield from _python_spans(name, code_start, "".join(code))
                fence = None
            else:
                code.append(line)
            prose.append("\n")
            continue
        prose.append(line)
    body = "".join(prose)
    for m in _ROLE_MD.finditer(body):
        yield Span(f"{name}:{_line_of(body, m.start())}", m.group(2), True)
    stripped = _ROLE_MD.sub(lambda m: " " * len(m.group(0)), body)
    for m in _CODE_MD.finditer(stripped):
        text_ = " ".join(m.group(1).split())
        where = f"{name}:{_line_of(stripped, m.start())}"
        yield Span(where, text_, False, suffix=_after_slash(stripped, m.start()))


def _python_spans(name: str, first_line: int, code: str) -> Iterator[Span]:
    for m in _PY_NAME.finditer(code):
        line = first_line + _line_of(code, m.start())
        yield Span(f"{name}:{line}", m.group(1) + m.group(2), True)
    for m in _PY_FROM.finditer(code):
        line = first_line + _line_of(code, m.start())
        for imported in m.group(2).replace("\n", " ").split(","):
            if imported.strip():
                full = f"{m.group(1)}.{imported.split()[0]}"
                yield Span(f"{name}:{line}", full, True)


def _docstring_spans(path: Path) -> Iterator[Span]:
    rel = path.relative_to(ROOT).as_posix()
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    tree = ast.parse(path.read_text())

    def visit(node: ast.AST, owner: str | None) -> Iterator[Span]:
        params: dict[str, str] = {}
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                if isinstance(arg.annotation, ast.Name):
                    params[arg.arg] = arg.annotation.id
        doc_node = None
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                doc_node = first if isinstance(first.value.value, str) else None
        if doc_node is not None:
            doc = typing.cast(str, typing.cast(ast.Constant, doc_node.value).value)
            start = doc_node.lineno
            for m in _ROLE_RST.finditer(doc):
                where = f"{rel}:{start + _line_of(doc, m.start()) - 1}"
                yield Span(where, m.group(2), True, module, owner, params)
            for m in _LITERAL_RST.finditer(doc):
                where = f"{rel}:{start + _line_of(doc, m.start()) - 1}"
                text_ = " ".join(m.group(1).split())
                suffix = _after_slash(doc, m.start())
                yield Span(where, text_, False, module, owner, params, suffix)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{owner}.{child.name}" if owner else child.name)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, owner)

    yield from visit(tree, None)


# --- what the package defines --------------------------------------------------------------------


class _Index:
    """Every name the package defines or quotes, every name the tests, the benchmarks and the
    noxfile define, and where each top-level name of the package lives."""

    def __init__(self) -> None:
        self.defined: set[str] = set()
        self.top_level: dict[str, set[str]] = {}
        self.modules: set[str] = set()
        self.loggers: set[str] = set()
        others = [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
        for path in [*sorted(PACKAGE.rglob("*.py")), *sorted(others), ROOT / "noxfile.py"]:
            tree = ast.parse(path.read_text())
            if path.is_relative_to(PACKAGE):
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                module = module.removesuffix(".__init__")
                self.modules.add(module)
                for node in tree.body:
                    for name in _bound_names(node):
                        self.top_level.setdefault(name, set()).add(module)
            for node in ast.walk(tree):
                self.defined.update(_bound_names(node))
                if not path.is_relative_to(PACKAGE):
                    continue  # elsewhere only what is defined (this file names stale names)
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "getLogger"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    self.loggers.add(str(node.args[0].value))
                if isinstance(node, ast.arg):
                    self.defined.add(node.arg)
                if isinstance(node, ast.Constant) and str(node.value).isidentifier():
                    self.defined.add(str(node.value))


def _bound_names(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield node.name
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    for target in targets:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name):
                yield sub.id
            elif isinstance(sub, ast.Attribute):
                yield sub.attr


_INDEX: _Index | None = None


def _index() -> _Index:
    global _INDEX
    if _INDEX is None:
        _INDEX = _Index()
    return _INDEX


# --- resolving -----------------------------------------------------------------------------------

_PATH = re.compile(
    r"^(?:backbeat_trio/)?((?:_[a-z]\w*|testing)(?:/\w+)*(?:\.py|/))(?:::([\w.]+))?$"
)
_REPO_PATH = re.compile(r"^((?:tests|benchmarks|examples|docs)/[\w./-]*|\.ci/run)$")
_DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\(\))?)((?:\.[A-Za-z_]\w*(?:\(\))?)+)(\((.*)\))?$")
_BARE = re.compile(r"^([A-Za-z_]\w*)(\((.*)\))?$")
_FILE_SUFFIXES = _words("py md toml go key json yaml yml txt png html js css cfg sh")
_CAMEL = re.compile(r"^[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)+$")
_CONSTANT = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
_SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")


class _Unresolved(Exception):
    pass


def _import(dotted: str) -> Any:
    """The object a fully qualified dotted name names (modules imported as needed)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        return _walk(obj, [(p, False) for p in parts[cut:]], dotted)
    raise _Unresolved(f"no module {parts[0]!r}")


def _instance_attributes(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] != "backbeat_trio":
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and isinstance(node.ctx, ast.Store)
            ):
                names.add(node.attr)
    return names


def _class_has(cls: type, name: str) -> bool:
    if hasattr(cls, name):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    if name in getattr(cls, "__struct_fields__", ()):
        return True
    if any(name in getattr(k, "__annotations__", {}) for k in cls.__mro__):
        return True
    return name in _instance_attributes(cls)


def _annotation_class(owner: Any, name: str | None) -> Any:
    """The class an attribute (or, with ``name`` None, a callable's return) is annotated as."""
    try:
        if name is None:
            hints = typing.get_type_hints(owner)
            target = hints.get("return")
        else:
            member = inspect.getattr_static(owner, name, None)
            if isinstance(member, property) and member.fget is not None:
                target = typing.get_type_hints(member.fget).get("return")
            else:
                target = typing.get_type_hints(owner).get(name)
    except Exception:
        return None
    return target if inspect.isclass(target) else None


def _walk(obj: Any, segments: list[tuple[str, bool]], dotted: str) -> Any:
    for name, called in segments:
        if obj is None:
            return None  # past what can be followed statically: accepted
        if inspect.ismodule(obj):
            if not hasattr(obj, name):
                raise _Unresolved(f"{obj.__name__} has no {name!r}")
            obj = getattr(obj, name)
        elif inspect.isclass(obj):
            if not _class_has(obj, name):
                raise _Unresolved(f"{obj.__qualname__} has no {name!r}")
            value = inspect.getattr_static(obj, name, None)
            if inspect.isclass(value) or inspect.ismodule(value):
                obj = value
            elif inspect.isfunction(value) or isinstance(value, staticmethod | classmethod):
                obj = getattr(obj, name)
            else:
                obj = _annotation_class(obj, name)
        elif hasattr(obj, name):
            obj = getattr(obj, name)
        else:
            raise _Unresolved(f"{dotted}: {obj!r} has no {name!r}")
        if called:
            obj = _annotation_class(obj, None) if callable(obj) else None
    return obj


def _check_keywords(obj: Any, args: str | None, dotted: str) -> None:
    if not args or obj is None or not callable(obj):
        return
    keywords = re.findall(r"(?:^|,)\s*([A-Za-z_]\w*)\s*=(?!=)", _top_level(args))
    if not keywords:
        return
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in keywords if k not in params]
    if unknown:
        raise _Unresolved(f"{dotted} takes no {', '.join(map(repr, unknown))}")


def _top_level(args: str) -> str:
    """``args`` with every nested bracket's content blanked out."""
    depth, kept = 0, []
    for char in args:
        depth -= char in ")]}"
        kept.append(char if depth == 0 else " ")
        depth += char in "([{"
    return "".join(kept)


def _root(span: Span, root: str) -> Any:
    """What a dotted name's first part names, or raise; None when it is prose."""
    index = _index()
    bare = root.removesuffix("()")
    if bare in ("backbeat_trio", "bb3"):
        return backbeat_trio
    if f"backbeat_trio.{bare}" in index.modules:
        return importlib.import_module(f"backbeat_trio.{bare}")
    if span.params and bare in span.params and span.module is not None:
        module = importlib.import_module(span.module)
        annotation = getattr(module, span.params[bare], None)
        if inspect.isclass(annotation) and annotation is not typing.Any:
            return _walk(annotation, [], root) if not root.endswith("()") else None
    if span.owner is not None and span.module is not None:
        owner = _import(f"{span.module}.{span.owner}")
        if inspect.isclass(owner) and _class_has(owner, bare) and bare != owner.__name__:
            return _walk(owner, [(bare, root.endswith("()"))], root)
    if span.module is not None:
        module = importlib.import_module(span.module)
        if hasattr(module, bare):
            return _walk(module, [(bare, root.endswith("()"))], root)
    for front in (backbeat_trio, backbeat_trio.testing):
        if bare in front.__all__:
            return _walk(front, [(bare, root.endswith("()"))], root)
    if root in INSTANCE_NAMES:
        return _import(INSTANCE_NAMES[root])
    homes = index.top_level.get(bare, set())
    if len(homes) == 1:
        return _walk(_import(next(iter(homes))), [(bare, root.endswith("()"))], root)
    if len(homes) > 1 and bare in index.defined:
        return None  # defined in several modules: the docs must say which to be checked
    if bare in OUTSIDE_MODULES:
        return importlib.import_module(bare)
    if bare.startswith("_"):
        raise _Unresolved(f"{bare!r} is no module or name of the package")
    if _CAMEL.match(bare) and bare not in OUTSIDE_NAMES:
        raise _Unresolved(f"{bare!r} is defined nowhere in the package")
    return None


def _resolve(span: Span) -> None:
    """Raise ``_Unresolved`` when ``span`` is a code name that names nothing."""
    text = span.text.strip().lstrip("~!")
    if span.role:
        text = re.sub(r"^.*<(.+)>$", r"\1", text)
    if m := _PATH.match(text):
        path = PACKAGE / m.group(1)
        if not path.exists():
            raise _Unresolved(f"no file backbeat_trio/{m.group(1)}")
        if m.group(2):
            module = ".".join(Path("backbeat_trio", m.group(1)).with_suffix("").parts)
            _import(f"{module.removesuffix('.__init__')}.{m.group(2)}")
        return
    if _REPO_PATH.match(text):
        if text.startswith("docs/_build"):
            return  # what the build writes: absent from a fresh clone
        if not (ROOT / text).exists():
            raise _Unresolved(f"no file {text}")
        return
    if text in _index().loggers:
        return  # a logger's name
    if m := _DOTTED.match(text):
        root, rest, _, args = m.groups()
        segments = [(s.removesuffix("()"), s.endswith("()")) for s in rest.split(".")[1:]]
        if segments[-1][0] in _FILE_SUFFIXES and not segments[-1][1]:
            return  # a file name: keys.toml, nats.go
        if text.startswith("backbeat_trio."):
            obj = _import(text.split("(")[0])
        else:
            start = _root(span, root)
            if start is None:
                return
            obj = _walk(start, segments, text)
        _check_keywords(obj, args, text)
        return
    if m := _BARE.match(text):
        name, call, args = m.groups()
        looks_like_code = (
            span.role
            or (name.startswith("_") and not name.startswith("__"))
            or (_CONSTANT.match(name) and not name.startswith("BACKBEAT_"))
            or _CAMEL.match(name)
            or _SNAKE.match(name)
            or call is not None
        )
        if not looks_like_code or span.suffix or name.startswith("_INBOX"):
            return  # prose, the rest of a name, or NATS's inbox prefix
        if f"backbeat_trio.{name}" in _index().modules:
            return  # a subpackage: _core
        if name in OUTSIDE_NAMES or name in OUTSIDE_MODULES or hasattr(builtins, name):
            return
        if span.role:
            obj = _root(span, name)
            if obj is None and name not in _index().defined:
                raise _Unresolved(f"{name!r} is defined nowhere in the package")
            return
        if name not in _index().defined:
            raise _Unresolved(f"{name!r} is defined nowhere in the package")
        if call is not None and args:
            try:
                obj = _root(span, name)
            except _Unresolved:
                return  # a method name used bare (``flush()``): defined is enough
            _check_keywords(obj, args, text)


def _all_spans() -> Iterator[Span]:
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        yield from _markdown_spans(path)
    for path in sorted(PACKAGE.rglob("*.py")):
        yield from _docstring_spans(path)


def _stale_names() -> list[tuple[Span, str]]:
    stale = []
    for span in _all_spans():
        try:
            _resolve(span)
        except _Unresolved as exc:
            stale.append((span, str(exc)))
    return stale


def test_every_code_name_in_the_docs_and_docstrings_names_code() -> None:
    stale = _stale_names()
    found = {(span.source.split(":")[0], span.text) for span, _ in stale}
    report = [
        f"{span.source}: `{span.text}`: {why}"
        for span, why in stale
        if (span.source.split(":")[0], span.text) not in PENDING
    ]
    assert not report, "code names that name nothing:\n" + "\n".join(report)
    gone = sorted(set(PENDING) - found)
    assert not gone, f"fixed, so remove from PENDING: {gone}"


@pytest.mark.parametrize(
    ("text", "stale"),
    [
        ("Client.emit_status", False),
        ("Client.emit_statuses", True),  # a renamed method
        ("bb3.open_client", False),
        ("bb3.open_clients", True),
        ("_core/intake.py", False),
        ("_core/intakes.py", True),
        ("_core/wire.py::encode_claim", False),
        ("_core/wire.py::encode_claims", True),
        ("_reverb._HAReports", True),  # a module alias from before the layered layout
        ("Config(jetstream=True)", False),
        ("Config(jet_stream=True)", True),
        ("health().local_degradation", False),
        ("health().local_degraded", True),
        ("_MAX_RECENT_ERRORS", True),
        ("MAX_CLOCK_SKEW", False),
        ("BeatTracker", False),
        ("BeatTrackers", True),
        ("backbeat_trio._core.wire.encode", False),
        ("backbeat_trio._core.wire.encoder", True),
        ("replay_bars", False),
        ("replay_bar", True),  # a public function named bare, then renamed
        ("degraded_since", True),  # a field HealthStatus's docstring named and never had
        ("keys.toml", False),  # prose: a file name
        ("beats_left", False),  # a field's name
        ("health", False),  # prose: one word
    ],
)
def test_the_name_check_tells_a_stale_name(text: str, stale: bool) -> None:
    span = Span("test", text, False, None, None)
    if stale:
        with pytest.raises(_Unresolved):
            _resolve(span)
    else:
        _resolve(span)


def test_no_docstring_example_imports_relatively() -> None:
    """Users copy examples as they are: ``from ..testing import`` works inside the package only."""
    documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    relative = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            doc = ast.get_docstring(node) if isinstance(node, documented) else None
            if doc and re.search(r"^\s*from \.+\w* import", doc, re.M):
                relative.append(f"{path.relative_to(ROOT)}: {getattr(node, 'name', 'module')}")
    assert not relative, relative
