"""The ``backbeat-trio`` command line."""

from .main import main as main

__all__ = ["main"]
