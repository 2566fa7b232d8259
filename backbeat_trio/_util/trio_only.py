"""The check every entry point that opens something makes first: is this trio?

Called from asyncio (or from trio-asyncio's asyncio side), trio's own calls fail deep inside
whatever was being opened, with a long traceback that names trio's internals (``Nursery
misnesting detected``) and not the mistake. The check names it before anything is opened.
"""

from __future__ import annotations

import sniffio
import trio

from .._errors import NotUnderTrio

__all__ = ["require_trio"]


def require_trio(entry: str) -> None:
    """Raise unless the caller is a trio task running trio code.

    Args:
        entry: the public name the user called, for the message (``"open_client"``).

    Raises:
        NotUnderTrio: called outside ``trio.run``, or from trio-asyncio's asyncio side.
    """
    try:
        library: str | None = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        in_trio = False
    else:
        in_trio = library == "trio"
    if in_trio:
        return
    where = f"under {library}" if library else "outside any async event loop"
    raise NotUnderTrio(
        f"backbeat_trio runs under trio, and {entry} was called {where}: call it from "
        f"trio.run(...) (from asyncio, trio-asyncio's trio_as_aio(...) runs trio code inside "
        f"an asyncio program)"
    )
