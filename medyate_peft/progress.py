"""Progress bars on a terminal; plain lines where the output is not one (CI logs, files, pipes).

A bar redrawn with carriage returns turns a log file into one endless line, so off a terminal the
same loop prints `desc: step/total, postfix` about every tenth of the way and at its end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm


class LineProgress:
    """Iterates `iterable`, printing one line about every tenth of `total` steps (each 100 without a total)."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, file: IO[str], parts: int = 10) -> None:
        self.iterable, self.desc, self.file = iterable, desc, file
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.every = max(1, self.total // parts) if self.total else 100
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def __iter__(self) -> Iterator:
        step = 0
        for step, item in enumerate(self.iterable, 1):
            yield item
            if step % self.every == 0 or step == self.total:
                self._line(step)
        if step and step % self.every and step != self.total:
            self._line(step)  # an iterable shorter than its total

    def _line(self, step: int) -> None:
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {step}/{self.total or '?'}{postfix}", file=self.file, flush=True)


def progress(iterable: Iterable, desc: str, total: int | None = None, disable: bool = False,
             file: IO[str] | None = None) -> tqdm | LineProgress | Iterable:
    """tqdm's bar on a terminal, `LineProgress` elsewhere; nothing when disabled."""
    file = file or sys.stderr
    if disable:
        return iterable
    if getattr(file, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, leave=False, file=file)
    return LineProgress(iterable, desc, total, file)
