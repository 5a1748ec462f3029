"""Kernel microbenchmarks: ``python -m tgolf.bench`` (see __main__.py).

A family adds cases in ``tgolf/bench/<family>.py`` with ``cases(shapes) -> list[BenchCase]`` and lists itself
in ``tgolf.bench.registry.FAMILIES``; the framework (core.py) checks each candidate against its reference
before timing it beside the anchors.
"""
from tgolf.bench.core import BenchCase, Impl, RunOptions, run_case, run_cases

__all__ = ["BenchCase", "Impl", "RunOptions", "run_case", "run_cases"]
