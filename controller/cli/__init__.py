"""Every ``lull`` command, in one package: ``main`` builds the parser from one module per
command (``traces``, ``sim``, ``platform``) and the benchmarks under ``bench/``."""

from controller.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
