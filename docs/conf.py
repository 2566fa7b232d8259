"""Sphinx configuration: the Markdown pages in docs/ (MyST) and the API reference (autodoc).

Built by ``nox -s docs`` and by ``tests/test_docs.py`` with warnings as errors.
"""

from __future__ import annotations

import backbeat_trio

project = "backbeat_trio"
author = "the backbeat_trio authors"
copyright = "the backbeat_trio authors, Apache-2.0"
release = backbeat_trio.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: ```{directive} fences, $-free pages, anchors for ## and ### headings so
# [text](page.md#heading) links resolve and are checked.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: the public front as users see it (members in source order, each page naming the
# members it shows), Google-style docstrings through napoleon.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options: dict[str, object] = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields of their class, not as attribute entries of their own: a
# property with the same name (Client.metrics) would otherwise be described twice.
napoleon_use_ivar = True

# Code blocks that are doctests (```{doctest} in the pages) run with the package imported as the
# README imports it.
doctest_global_setup = "import backbeat_trio as bb3"

html_theme = "furo"
html_title = f"backbeat_trio {release}"


def setup(app: object) -> None:
    """``nats`` code blocks (nats-server configuration) have no Pygments lexer: shown as text."""
    from pygments.lexers.special import TextLexer

    app.add_lexer("nats", TextLexer)  # type: ignore[attr-defined]
