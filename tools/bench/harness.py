"""Timing harness of launch/bench.py: warm-ups under a compile timer, alternating timed rounds, medians."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from typing import Any, Callable


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def div(a, b):
    return a / b if (a is not None and b) else None


class CompileTimer:
    """Sums jax.monitoring's backend-compile durations (and tracing + lowering) while `track()` is active."""

    BACKEND = "/jax/core/compile/backend_compile_duration"
    OTHER = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        import jax

        self.active = False
        self.backend = self.other = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if self.active:
            if event == self.BACKEND:
                self.backend += duration
            elif event in self.OTHER:
                self.other += duration

    @contextlib.contextmanager
    def track(self, into: dict):
        b0, o0, self.active = self.backend, self.other, True
        try:
            yield
        finally:
            self.active = False
            into["compile_s"] = into.get("compile_s", 0.0) + self.backend - b0
            into["trace_lower_s"] = into.get("trace_lower_s", 0.0) + self.other - o0


def measure(fn: Callable[[], Any]) -> dict:
    """Run fn; its dict result (extra figures, maybe its own "s") or just the wall time."""
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    out = dict(out) if isinstance(out, dict) else {}
    out.setdefault("s", dt)
    return out


def run_rounds(ctx: "Ctx", ours: list[Callable[[], Any]], theirs: list[Callable[[], Any]] | None,
               info: dict) -> tuple[list[list[dict]], list[list[dict]]]:
    """Warm-up of every function (ours twice, under the compile timer), then --repeats rounds, each running all of
    ours then all of theirs, so related measurements (e.g. t(1) and t(N+1)) are taken close together in time.
    Returns per-function lists of measurements; the raw seconds also go into info["runs_s"]."""
    with ctx.compile_timer.track(info):
        for _ in range(2):  # twice: the second call takes the cache-reuse paths (ThinkerEngine resets a kept cache)
            for fn in ours:
                measure(fn)
    for fn in theirs or ():
        measure(fn)
    ro: list[list[dict]] = [[] for _ in ours]
    rt: list[list[dict]] = [[] for _ in theirs or ()]
    for _ in range(ctx.repeats):
        for i, fn in enumerate(ours):
            ro[i].append(measure(fn))
        for i, fn in enumerate(theirs or ()):
            rt[i].append(measure(fn))
    info.setdefault("runs_s", []).append({"ours": [[r["s"] for r in x] for x in ro],
                                          "theirs": [[r["s"] for r in x] for x in rt]})
    return ro, rt


def run_pair(ctx: "Ctx", ours: Callable[[], Any], theirs: Callable[[], Any] | None, info: dict) -> tuple[list, list]:
    """Warm-ups (see run_rounds), then --repeats rounds alternating ours, theirs."""
    ro, rt = run_rounds(ctx, [ours], None if theirs is None else [theirs], info)
    return ro[0], rt[0] if rt else []


def med(runs: list[dict], key: str = "s"):
    return median([r.get(key) for r in runs])


class Ctx:
    """What the phases share: loaded models, config, flags, the compile timer and the report."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
