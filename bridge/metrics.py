"""Prometheus metrics: what an operator alerts on. The exposition (``GET /metrics``) is api/ops.py.

Two kinds live here:

* **Events**, counted where they happen (a few call sites: a run ending, a kernel starting, a
  session's kernels stopping, a pool refill, a refused request): module-level counters and
  histograms in :data:`REGISTRY`. One server is one process, so process-wide is per-server.
* **State**, read from the live registry at scrape time by :class:`LiveCollector` (sessions by
  dialect/language/state, pool depth, queued runs, per-keypair usage): nothing to keep in sync.

Label values are bounded: dialects, languages, kernelspecs, run modes, outcomes and refusal
reasons are fixed sets; access keys are labels only for keypairs that exist in the store.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import AuthFailed, Forbidden, QuotaExceeded, RateLimited

if TYPE_CHECKING:
    from .kernels import Kernel
    from .runs import Run
    from .service import Bridge

PREFIX = "kernel_bridge"
# *_created series double a scrape and alert on nothing.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

# Kernel starts take a second or more; runs from milliseconds to the 1 h hard timeout.
START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(f"{PREFIX}_{name}", doc, labels, registry=REGISTRY)


def _histogram(name: str, doc: str, labels: Sequence[str] = (), *,
               buckets: Sequence[float]) -> Histogram:
    return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=REGISTRY)


RUNS = _counter("runs_total", "Runs (queries, batch runs, executions) by mode and how "
                "they ended: finished, exec-timeout, failed (kernel died), cancelled.",
                ["mode", "outcome"])
RUN_SECONDS = _histogram("run_duration_seconds", "Wall time of a run, from its start "
                         "in the kernel to its end.", ["mode"], buckets=RUN_BUCKETS)
QUEUE_WAIT = _histogram("queue_wait_seconds", "Time a run waited in its session's "
                        "queue before its kernel took it.", buckets=RUN_BUCKETS)
EXECUTIONS = _counter("executions_total", "Executions of the Sandbox dialect by "
                      "language and outcome: completed (the program ran to its end, any exit "
                      "code) or failed (timeout, kernel died or did not start, server stopped).",
                      ["language", "outcome"])
# For admission control (bridge/admission.py): time a request waited for a kernel slot.
ADMISSION_WAIT = _histogram("admission_wait_seconds", "Time a request waited for a "
                            "kernel slot (keypair concurrency or host budget).",
                            buckets=RUN_BUCKETS)
KERNEL_STARTS = _histogram("kernel_start_seconds", "Time from launch to a kernel "
                           "answering, by kernelspec (failed starts included).",
                           ["kernelspec"], buckets=START_BUCKETS)
KERNEL_START_FAILURES = _counter("kernel_start_failures_total", "Kernels that did not "
                                 "come up.", ["kernelspec"])
KERNEL_DEATHS = _counter("kernel_deaths_total", "Kernels that died under a run (cause: "
                         "oom when the cgroup saw an OOM kill, else exit).", ["language", "cause"])
OOM_KILLS = _counter("oom_kills_total", "Processes the OOM killer ended inside kernel "
                     "cgroups, counted when their session ends.", ["language"])
TIMEOUTS = _counter("timeouts_total", "Runs ended by their deadline.", ["mode"])
POOL_REFILLS = _counter("pool_refills_total", "Kernel starts queued to refill the warm "
                        "pool.", ["language"])
POOL_WAITS = _counter("pool_waits_total", "Takes that found no kernel ready and waited for "
                      "one starting (each may grow the stock: kernel_bridge_pool_target).",
                      ["language"])
POOL_TAKES = _counter("pool_takes_total", "New sessions that asked the warm pool for a "
                      "kernel: hit (got one) or miss (cold start).", ["language", "result"])
REFUSALS = _counter("refusals_total", "Requests refused: unauthorized (401), forbidden "
                    "(403), quota (a keypair's concurrency), rate_limited (429), budget (the "
                    "host memory budget), unavailable (other 503s).",
                    ["dialect", "reason"])
HTTP_REQUESTS = _counter("http_requests_total", "HTTP requests by dialect and status "
                         "class.", ["dialect", "code"])
HTTP_SECONDS = _histogram("http_request_duration_seconds", "HTTP request handling "
                          "time by dialect.", ["dialect"], buckets=RUN_BUCKETS)
# Replicas (bridge/replicas.py, api/forward.py): requests handed to the replica owning their
# session, and what this replica took over from dead ones.
FORWARDED = _counter("forwarded_requests_total", "Requests forwarded to the replica "
                     "that owns their session, by transport (http, websocket) and outcome (ok, "
                     "unreachable).", ["transport", "outcome"])
ADOPTED = _counter("adopted_total", "Sessions, job sessions and executions this "
                   "replica claimed from replicas whose lease ran out.")

REFUSAL_REASONS = {401: "unauthorized", 403: "forbidden", 412: "quota", 429: "rate_limited",
                   503: "unavailable"}


def refusal_reason(status: int, error: BaseException | None) -> str | None:
    """The ``reason`` label of a refused request, or None when it was not a refusal.

    By the core's error where there is one (the host memory budget answers 412, 429 or 503
    depending on the dialect, and is told apart by its class), else by the status."""
    if status not in REFUSAL_REASONS:
        return None
    if error is not None:
        for cls in type(error).__mro__:
            if "Budget" in cls.__name__:
                return "budget"
        for cls, reason in _REFUSALS:
            if isinstance(error, cls):
                return reason
    return REFUSAL_REASONS[status]


_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (AuthFailed, "unauthorized"), (Forbidden, "forbidden"), (QuotaExceeded, "quota"),
    (RateLimited, "rate_limited"))


def run_ended(run: Run, language: str, kernel_died: bool, oom: bool) -> None:
    """A session's run reached a terminal state (bridge.sessions' worker calls this)."""
    mode, outcome = run.mode, run.state.value
    RUNS.labels(mode, outcome).inc()
    if run.started_at is not None:
        QUEUE_WAIT.observe(max(0.0, run.started_at - run.created_at))
        if run.finished_at is not None:
            RUN_SECONDS.labels(mode).observe(max(0.0, run.finished_at - run.started_at))
    if outcome == "exec-timeout":
        TIMEOUTS.labels(mode).inc()
    if kernel_died:
        KERNEL_DEATHS.labels(language, "oom" if oom else "exit").inc()


def kernels_stopped(kernels: list[Kernel], language: str) -> None:
    """A session's kernels are about to stop: count the OOM kills their cgroups saw."""
    for k in kernels:
        cg = k.cgroup
        if cg is not None:
            kills = cg.oom_kills()
            if kills:
                OOM_KILLS.labels(language).inc(kills)


class LiveCollector(Collector):
    """Gauges read from the running bridge at scrape time (no bookkeeping to drift)."""

    def __init__(self) -> None:
        self.bridge: Bridge | None = None

    def collect(self) -> Iterator[Metric]:
        bridge = self.bridge
        if bridge is None:
            return
        sessions = GaugeMetricFamily(f"{PREFIX}_sessions", "Live sessions by dialect, language "
                                     "and state.", labels=["dialect", "language", "state"])
        queued = GaugeMetricFamily(f"{PREFIX}_queued_runs", "Runs waiting in session queues.")
        by_key: Tally[str] = Tally()
        tally: Tally[tuple[str, str, str]] = Tally()
        waiting = 0
        for s in bridge.sessions.all():
            tally[(s.origin, s.language.name, s.state.value)] += 1
            by_key[s.access_key] += 1
            waiting += s.queue.waiting
        for labels, n in sorted(tally.items()):
            sessions.add_metric(list(labels), n)
        queued.add_metric([], waiting)
        yield sessions
        yield queued
        yield from self._pool(bridge)
        yield from self._keypairs(bridge, by_key)
        yield from self._admission(bridge)

    @staticmethod
    def _pool(bridge: Bridge) -> Iterator[Metric]:
        from .languages import LANGUAGES

        depth = GaugeMetricFamily(f"{PREFIX}_pool_kernels", "Warm-pool kernels by language and "
                                  "state (ready or starting).", labels=["language", "state"])
        target = GaugeMetricFamily(f"{PREFIX}_pool_target", "Warm-pool size now: the configured "
                                   "size plus what demand added.",
                                   labels=["language"])
        for lang in LANGUAGES:
            size = bridge.pool.size(lang)
            if size == 0:
                continue
            ready = bridge.pool.ready(lang)
            depth.add_metric([lang.name, "ready"], ready)
            depth.add_metric([lang.name, "starting"], bridge.pool.stocked(lang) - ready)
            target.add_metric([lang.name], size)
        yield depth
        yield target

    @staticmethod
    def _keypairs(bridge: Bridge, sessions: Tally[str]) -> Iterator[Metric]:
        # Labels only for keypairs in the store: a scan with made-up keys adds no series.
        queries = CounterMetricFamily(f"{PREFIX}_keypair_queries", "Queries and executions "
                                      "per keypair (persisted across restarts).",
                                      labels=["access_key"])
        live = GaugeMetricFamily(f"{PREFIX}_keypair_sessions", "Live sessions per keypair.",
                                 labels=["access_key"])
        for kp in bridge.keypairs.all():
            queries.add_metric([kp.access_key], kp.total_queries)
            live.add_metric([kp.access_key], sessions.get(kp.access_key, 0))
        yield queries
        yield live

    @staticmethod
    def _admission(bridge: Bridge) -> Iterator[Metric]:
        # Hook for admission control (bridge/admission.py): when the bridge has one exposing
        # ``waiting()`` (requests queued for a kernel slot), it is reported here.
        admission = getattr(bridge, "admission", None)
        waiting = getattr(admission, "waiting", None)
        if callable(waiting):
            g = GaugeMetricFamily(f"{PREFIX}_admission_queue_depth", "Requests waiting for a "
                                  "kernel slot (keypair concurrency or host budget).")
            g.add_metric([], float(waiting()))
            yield g


LIVE = LiveCollector()
REGISTRY.register(LIVE)
ProcessCollector(registry=REGISTRY)  # the server's CPU, memory and open files


def watch(bridge: Bridge) -> None:
    """Report this bridge's live state (the last one constructed in the process wins)."""
    LIVE.bridge = bridge
