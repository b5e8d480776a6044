"""Progress on long work, in one place for every command.

On a terminal (stderr is a TTY) a transient Rich progress bar with the elapsed time and an ETA;
otherwise (a log, CI, a pipe) one plain line per finished unit on stderr, e.g.
``bench: 3/13 rows done (zoo @ 64) 12.3 s``, so a long run is never silent. Model loading gets a
spinner with what is happening on a terminal, and plain lines only for what is slow (an offline
model's one-time build, a full-size random init, a checkpoint from the HF cache).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from zoocli.cli.console import err

class Steps:
    """A unit counter shown as a bar (terminal) or as plain lines (otherwise).

    ``advance(what)`` moves the bar by fine-grained work (a model run) without printing;
    ``finished(what)`` reports one finished unit (a row, a batch of predictions): the bar moves
    by ``bar_units`` and a non-terminal gets a line ``<label>: i/n <noun> done (what) t s, eta
    u s``. ``log_rate=(fraction, seconds)``: off a terminal, a line only when another
    ``fraction`` of the total is done or ``seconds`` have passed since the last one (and at the
    end), so a log holds a long run (eval: every 10% or 30 s).
    """

    def __init__(self, label: str, total: int | None, noun: str, *, bar_total: int | None = None,
                 rate_unit: str | None = None, disable: bool = False, min_interval_s: float = 0.0,
                 log_rate: tuple[float, float] | None = None, eta: bool = True):
        self.label, self.total, self.noun = label, total, noun
        self.disable, self.min_interval_s = disable, min_interval_s
        self.log_rate, self._eta = log_rate, eta
        self._logged = 0  # the count at the last plain line
        self.count = 0
        self.tty = err.is_terminal and not disable
        self._bar_total = total if bar_total is None else bar_total
        self._rate_unit = rate_unit
        self._bar = self._task = None
        self._t0 = time.perf_counter()
        self._last_line = float("-inf")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def __enter__(self) -> Steps:
        self._t0 = time.perf_counter()
        if self.tty:
            self._bar = _rich_bar(self._rate_unit)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self._bar_total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, what: str | None = None, n: int = 1) -> None:
        if self._bar is not None:
            kw = {} if what is None else {"description": what}
            self._bar.update(self._task, advance=n, **kw)

    def set_progress(self, done: int, total: int | None, what: str | None = None) -> None:
        """Absolute progress (``done`` of ``total`` units); plain lines throttled by ``min_interval_s``."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        self.count = done
        last = total is not None and done >= total
        if not self.disable and (last or self.elapsed - self._last_line >= self.min_interval_s):
            self._line(what)

    def finished(self, what: str | None = None, n: int = 1, bar_units: int | None = None) -> None:
        self.count += n
        if self._bar is not None:
            self.advance(what, n if bar_units is None else bar_units)
        elif not self.disable and self._due():
            self._line(what)

    def _due(self) -> bool:
        """Whether a plain line is due now (``log_rate``; always without it)."""
        if self.log_rate is None or not self.total:
            return True
        fraction, seconds = self.log_rate
        step = max(1, int(fraction * self.total))
        return (self.count >= self.total or self.count // step > self._logged // step
                or self.elapsed - self._last_line >= seconds)

    def eta_s(self) -> float | None:
        """Seconds to go at the rate so far (None before the first unit, without a total)."""
        if not self._eta or not self.total or not self.count or self.count >= self.total:
            return None
        return self.elapsed / self.count * (self.total - self.count)

    def note(self, text: str) -> None:
        """One line on stderr on a terminal or not (e.g. how many rows a rerun skips)."""
        if not self.disable:
            (self._bar.console if self._bar is not None else err).print(text, highlight=False,
                                                                        soft_wrap=True)

    def _line(self, what: str | None) -> None:
        self._last_line = self.elapsed
        self._logged = self.count
        of = f"/{self.total}" if self.total is not None else ""
        detail = f" ({what})" if what else ""
        eta = self.eta_s()
        tail = "" if eta is None else f", eta {duration(eta)}"
        err.print(f"{self.label}: {self.count}{of} {self.noun} done{detail} {self.elapsed:.1f} s{tail}",
                  markup=False,
                  highlight=False, soft_wrap=True)


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``: a time estimate as people say it."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rich_bar(unit: str | None):
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.2f} {unit}/s", style="progress.data.speed")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(RateColumn())
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=err, transient=True)


@contextlib.contextmanager
def loading(model: str, quiet: bool = False) -> Iterator[Any]:
    """A status reporter for loading ``model``: yields ``on_status(text, slow=False)`` for the
    adapters' loader. A terminal shows a spinner with the latest text. A non-terminal gets only
    the slow steps (an offline model's first build, a full-size random init, a download-size
    checkpoint) and then one ``loaded MODEL in T s`` line; a quick load prints nothing there, so a
    failure right after it is still one line."""
    t0 = time.perf_counter()
    if quiet:
        yield lambda text, slow=False: None
        return
    if err.is_terminal:
        with err.status(f"loading {model}…") as status:
            yield lambda text, slow=False: status.update(text)
        return
    said = []

    def on_status(text: str, slow: bool = False) -> None:
        if slow:
            said.append(text)
            err.print(text, highlight=False, soft_wrap=True, markup=False)

    yield on_status
    if said:
        err.print(f"loaded {model} in {time.perf_counter() - t0:.1f} s", highlight=False, markup=False)
