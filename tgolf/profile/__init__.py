"""Profiling of training steps: ``python -m tgolf.profile`` (see __main__.py).

run.py runs steps under torch.profiler and window.py records a window of a real training run's steps
(``--profile-steps A:B``); trace.py turns a chrome trace into per-step time by category (categories.py); report.py
writes the markdown/JSON/PNG report; telemetry.py samples GPU clocks, power and temperature; env.py records what the
numbers ran on. tgolf.nvtx holds the ranges the model and the training loop mark their phases with.
"""
