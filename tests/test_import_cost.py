"""What ``import backbeat_trio`` loads: nothing meant for tests, and no asyncio machinery until a
NATS transport opens (trio-asyncio, once imported, changes how every asyncio loop in the process
runs)."""

from __future__ import annotations

import subprocess
import sys

LOADED_LATER = ("pytest", "trio.testing", "hypothesis", "asyncio", "trio_asyncio", "nats")


def test_importing_the_package_imports_neither_test_tools_nor_asyncio() -> None:
    code = (
        f"import sys, backbeat_trio\nprint(sorted(m for m in {LOADED_LATER!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_the_bridge_loads_when_its_classes_are_asked_for() -> None:
    code = (
        "import sys, backbeat_trio as bb3\n"
        "assert 'trio_asyncio' not in sys.modules\n"
        "print(bb3.NatsTransport.__module__, 'trio_asyncio' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["backbeat_trio._bridge.nats", "True"]
