"""A text progress bar for long management commands, drawn on stderr (stdlib only)."""

import time
from collections.abc import Callable

_WIDTH = 30


class ProgressBar:
    """``[#########.....]  60%  60,000/100,000 rows``, redrawn at most ten times a second."""

    def __init__(self, write: Callable[[str], None], label: str = "rows"):
        self.write = write
        self.label = label
        self.last_draw = 0.0
        self.drawn = False

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        fraction = min(done / total, 1.0) if total else 1.0
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + "." * (_WIDTH - filled)
        self.write(f"\r[{bar}] {fraction:4.0%}  {done:,}/{total:,} {self.label}")
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.write("\n")
