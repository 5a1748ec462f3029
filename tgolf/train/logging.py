"""Run log: baseline-style lines to stdout and <run>/train.log (rank 0 only), and a progress bar on a terminal."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    def __init__(self, path: Path | None, enabled: bool = True):
        self.enabled = enabled
        self._file = open(path, "a", encoding="utf-8") if (enabled and path is not None) else None

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        tqdm.write(line, file=sys.stdout)  # prints above an active progress bar instead of through it
        sys.stdout.flush()
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def progress(self, total: float, initial: float = 0, unit: str = "step") -> tqdm:
        """A progress bar on stderr when it is a terminal; a disabled (no-op) bar otherwise."""
        fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}{unit} [{elapsed}<{remaining}{postfix}]"
        return tqdm(total=total, initial=initial, desc="train", unit=unit, dynamic_ncols=True, leave=False,
                    bar_format=fmt if unit == "s" else None, disable=not (self.enabled and sys.stderr.isatty()))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
