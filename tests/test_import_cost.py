"""What ``import backbeat_trio`` loads: nothing meant for tests."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_imports_neither_pytest_nor_trio_testing() -> None:
    code = (
        "import sys, backbeat_trio\n"
        "print(sorted(m for m in ('pytest', 'trio.testing', 'hypothesis') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
