"""Honest timing: synchronise the device before every clock read, keep warm-up out of the figures.

``Timer`` records named sections in milliseconds; its clock and sync are injectable so tests need
neither a GPU nor sleeps. ``TokenClock`` is the one first / last-token clock (prefill and decode
times of every generate path); ``add_ttft_e2e`` the one definition of TTFT and end to end;
``summarize`` gives median / min / max over repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def device_sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (CUDA / MPS); a no-op on CPU."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available():
            torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


class Timer:
    """``with timer("vision"): ...`` adds the section's wall time (ms) to ``timer.ms["vision"]``."""

    def __init__(
        self,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.sync = sync or (lambda: None)
        self.clock = clock
        self.ms: dict[str, float] = {}

    def now(self) -> float:
        """A synchronised clock read, in seconds."""
        self.sync()
        return self.clock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            self.add(name, (self.now() - t0) * 1e3)

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms


class TokenClock:
    """THE first / last-token clock of every generate path (stock ``generate`` and the prune loop).

    ``start()`` just before the prefill, ``tick()`` when each new token's logits exist (an instance
    is also a transformers logits processor: ``__call__(input_ids, scores)`` ticks and passes the
    scores through). ``prefill_ms`` = start -> first tick, ``decode_ms`` = first -> last tick;
    both 0 when no token came. Every read is device-synchronised.
    """

    now = staticmethod(time.perf_counter)

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self.t0: float | None = None
        self.first: float | None = None
        self.last: float | None = None

    def _read(self) -> float:
        device_sync(self.device)
        return self.now()

    def start(self) -> None:
        self.t0, self.first, self.last = self._read(), None, None

    def tick(self) -> None:
        t = self._read()
        if self.first is None:
            self.first = t
        self.last = t

    def __call__(self, input_ids, scores):
        self.tick()
        return scores

    @property
    def prefill_ms(self) -> float:
        return (self.first - self.t0) * 1e3 if self.first is not None else 0.0

    @property
    def decode_ms(self) -> float:
        return (self.last - self.first) * 1e3 if self.first is not None else 0.0


TTFT_STAGES = ("preprocess", "vision", "selection", "build", "prefill")


def add_ttft_e2e(ms: dict[str, float], *, selection_in_prefill: bool = False) -> dict[str, float]:
    """THE definition of time to first token and end to end, used by ask, compare, bench and eval.

    ``ttft`` = preprocess + vision + selection + build + prefill (stages that did not run count 0);
    for in-LLM methods (``selection_in_prefill``) the selection already happens inside ``prefill``
    and is not added again. ``e2e`` = ``ttft`` + ``decode``. Sets both keys on ``ms`` and returns it.
    """
    stages = [s for s in TTFT_STAGES if not (selection_in_prefill and s == "selection")]
    ms["ttft"] = sum(ms.get(s, 0.0) for s in stages)
    ms["e2e"] = ms["ttft"] + ms.get("decode", 0.0)
    return ms


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (warm-up already left out)."""
    if not values:
        raise ValueError("no measurements to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory since the last reset: CUDA max allocated, else the process's peak RSS."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device | str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
