"""The ``cai`` command (``cai = "cai.cli:main"``)."""

from cai.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
