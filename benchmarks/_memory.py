"""Peak memory of one call, measured in a fresh process (shared by the benchmarks).

Why a fresh process (docs/benchmarks.md, PITFALLS "memory measurements"): the first
``torch.func.vjp`` of a process imports ~800 modules and the first convolution backward
allocates ~30 MB once, and the resident high-water mark never goes down, so peaks measured one
after another in one process say more about their order than about the methods. The recipe:

1. :func:`run_isolated` runs a top-level (picklable) function in a new ``spawn`` process and
   returns its result;
2. inside it, the function does a warm-up call on a tiny input, builds the real inputs, then
   measures the real call with :class:`PeakMemory`, which reports the growth of the peak over
   the memory in use just before the call.

On CPU the peak is the resident set size: ``getrusage(RUSAGE_SELF).ru_maxrss`` read before and
after the call. On Linux the high-water mark is first reset to the current RSS (``echo 5 >
/proc/self/clear_refs``), so the growth is exactly "peak during the call − RSS before it";
where that is not possible the growth only counts what rises above the process's earlier peak
(``slack_mib`` says how much earlier peak lay above the RSS before the call, i.e. how much could
be hidden). On CUDA it is ``torch.cuda.max_memory_allocated`` − ``memory_allocated`` before
(tensor memory only, not the caching allocator's reserve).

Example (a benchmark script)::

    from _memory import PeakMemory, run_isolated

    def measure(n):                          # top level, so that spawn can pickle it
        import torch
        torch.ones(8).sum()                  # warm-up on a tiny input
        x = torch.randn(n)
        with PeakMemory(x.device) as peak:
            y = (x.exp() * 2).sum()
        return peak.mib

    if __name__ == "__main__":
        print(run_isolated(measure, 10_000_000))    # ≈ 78 MiB: two 38 MiB float32 temporaries
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import sys
import time
import traceback
from typing import Any, Callable

__all__ = ["PeakMemory", "run_isolated", "rss_mib", "maxrss_mib", "reset_peak_rss", "load_average"]

_STATUS = "/proc/self/status"


def maxrss_mib() -> float:
    """The process's resident high-water mark in MiB (``ru_maxrss``: KiB on Linux, B on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (2**20 if sys.platform == "darwin" else 2**10)


def rss_mib() -> float | None:
    """The current resident set size in MiB (Linux ``/proc``), or ``None`` where unavailable."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux ≥ 4.0); ``True`` if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: growth of peak memory during the block, in MiB (``.mib``).

    ``device``: a ``torch.device`` or string; CUDA devices use the caching allocator's
    statistics, anything else the process RSS. ``gc.collect()`` runs before the block so that
    garbage of earlier calls is not counted as "in use". After the block, ``.info`` holds the
    raw figures (``before_mib``, ``peak_mib``, ``rss_before_mib``, ``slack_mib``, ``reset``,
    ``seconds``) for a JSON report.
    """

    def __init__(self, device: Any = "cpu"):
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.mib: float = float("nan")
        self.info: dict[str, Any] = {}

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
            self.info = {"kind": "cuda max_memory_allocated", "before_mib": self._before}
        else:
            reset = reset_peak_rss()
            rss = rss_mib()
            self._before = maxrss_mib()
            self.info = {
                "kind": "ru_maxrss", "reset": reset, "before_mib": self._before,
                "rss_before_mib": rss,
                "slack_mib": None if rss is None else max(0.0, self._before - rss),
            }
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = maxrss_mib()
        self.info["seconds"] = time.perf_counter() - self._t0
        self.info["peak_mib"] = peak
        self.mib = self.info["growth_mib"] = peak - self._before


def run_isolated(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh ``spawn`` process; returns its (picklable) result.

    ``fn`` must be importable by the child: a top-level function of a module, or of the main
    script when that script guards its entry point with ``if __name__ == "__main__"`` (not a
    script read from stdin). An exception raised in the child is re-raised here as
    ``RuntimeError`` carrying the child's traceback; a child that dies without answering (killed,
    out of memory, failed import) raises ``RuntimeError`` with its exit code. Set
    ``torch.set_num_threads`` inside ``fn`` to control the child's threads.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args, kwargs), daemon=True)
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"isolated call {getattr(fn, '__name__', fn)!r} died without a "
                           f"result (exit code {child.exitcode})") from None
    finally:
        receive.close()
    child.join()
    if not ok:
        raise RuntimeError(f"isolated call {getattr(fn, '__name__', fn)!r} failed:\n{value}")
    return value


def _child(send: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        result = (True, fn(*args, **kwargs))
    except BaseException:  # report everything, the parent re-raises
        result = (False, traceback.format_exc())
    send.send(result)
    send.close()


def load_average() -> tuple[float, float, float] | None:
    """``os.getloadavg()`` where available: how busy the machine was while measuring."""
    try:
        return os.getloadavg()
    except OSError:
        return None
