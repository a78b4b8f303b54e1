"""Progress for long management commands: a tqdm bar fed with (done, total) callbacks."""

from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


class Progress:
    """A tqdm bar driven by ``update(done, total)``, the shape the CSV services report in.

    ``stream`` is the command's stderr (``self.stderr._out``: Django's wrapper would append a
    newline to every redraw).
    """

    def __init__(self, stream: TextIO, unit: str):
        self.bar = tqdm(
            total=0, file=stream, mininterval=0.1, bar_format="{l_bar}{bar:30}| {n_fmt}/{total_fmt} " + unit
        )

    @property
    def update(self) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            if self.bar.total != total:
                self.bar.reset(total=total)
            self.bar.update(done - self.bar.n)

        return update

    def finish(self) -> None:
        self.bar.close()
