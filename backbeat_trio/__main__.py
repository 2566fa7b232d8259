"""``python -m backbeat_trio``: the ``backbeat-trio`` command line."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
