"""How Azure Container Apps decides an app's replica count: the scaling model of the tests'
platform stand-ins (tests/arm_endpoint.py runs it over real replica processes;
benchmarks/cloud_sim.py over simulated ones). Pure logic and a clock: no I/O.

What it follows (Microsoft's pages, quoted where it matters):

* HTTP rule, https://learn.microsoft.com/azure/container-apps/scale-app#http: "Every 15
  seconds, the number of concurrent requests is calculated as the number of requests in the
  past 15 seconds divided by 15." A replica is added when that exceeds ``concurrentRequests``:
  the rule counts *arrivals*, not requests in flight, so a burst of long calls reads as ~0
  once it has arrived.
* Custom (KEDA) rules, the same page, "Scale behavior": event sources are polled every
  ``pollingInterval`` (default 30 s; "This value doesn't apply to HTTP and TCP scale rules"),
  ``desiredReplicas = ceil(currentMetricValue / targetMetricValue)``; the azure-queue scaler's
  metric is the queue's message count, visible *and* invisible ones by default
  (https://keda.sh/docs/latest/scalers/azure-storage-queue/, ``queueLengthStrategy``: all).
* Scale-up steps "1, 4, 100% of current" (scale-app, "Scale behavior"), over a 15 s period as
  the Kubernetes HPA's default behaviour that KEDA scales through has them (Pods 4 or Percent
  100 per ``periodSeconds: 15``, selectPolicy Max, no scale-up stabilization:
  https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#default-behavior):
  an app that starts a period at ``n`` replicas grows to at most ``max(n + 4, 2 * n)`` within
  it (from zero: 4), however often the rules are read. Growing no faster is the harder case.
* "Cool down period is how long after the last event was observed before the application
  scales down to its minimum replica count" (``cooldownPeriod``, default 300 s). Between
  minimum and current, Azure applies a scale-down stabilization window of 300 s that an app
  cannot set; not knowing more, the model uses ``cooldownPeriod`` for it too, so a test's short
  cooldown shortens both (scaling in sooner is the harder case for an SDK whose calls run on).
* Which replica goes at a scale-in is not documented (KEDA/HPA picks any: kedacore/keda#2901);
  the model picks the one with the most requests in flight, the hardest case.
* Minimum values of pollingInterval and cooldownPeriod are not documented (the REST spec gives
  none): the model takes any positive number, as tests need seconds.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field

#: The HTTP rule's window, seconds (scale-app: "Every 15 seconds ... divided by 15").
HTTP_WINDOW = 15.0
DEFAULT_POLLING = 30.0
DEFAULT_COOLDOWN = 300.0
DEFAULT_MAX_REPLICAS = 10


@dataclass
class ScaleSettings:
    """What an app's ``template.scale`` says, read once per revision."""

    min_replicas: int = 0
    max_replicas: int = DEFAULT_MAX_REPLICAS
    polling: float = DEFAULT_POLLING
    cooldown: float = DEFAULT_COOLDOWN
    http_target: int | None = None  # concurrentRequests of the HTTP rule, None without one
    queue_target: int | None = None  # queueLength of the azure-queue rule, None without one

    @classmethod
    def from_template(cls, template: dict) -> ScaleSettings:
        scale = template.get("scale") or {}
        s = cls(
            min_replicas=int(scale.get("minReplicas") or 0),
            max_replicas=int(DEFAULT_MAX_REPLICAS if scale.get("maxReplicas") is None else scale["maxReplicas"]),
            polling=float(scale.get("pollingInterval") or DEFAULT_POLLING),
            cooldown=float(scale.get("cooldownPeriod") or DEFAULT_COOLDOWN),
        )
        for rule in scale.get("rules") or []:
            if "http" in rule:
                # "concurrentRequests ... Default 10, Min 1" (scale-app, HTTP table)
                s.http_target = max(1, int((rule["http"].get("metadata") or {}).get("concurrentRequests", 10)))
            queue = queue_rule(rule)
            if queue is not None:
                s.queue_target = max(1, int(queue.get("queueLength") or 5))  # KEDA's default queueLength: 5
        return s


def queue_rule(rule: dict) -> dict | None:
    """An azure-queue rule's settings in either ARM shape (``azureQueue``, or ``custom`` of type
    azure-queue with string metadata): {queueName, queueLength, accountName, auth, identity}."""
    if "azureQueue" in rule:
        return dict(rule["azureQueue"])
    custom = rule.get("custom") or {}
    if custom.get("type") == "azure-queue":
        meta = custom.get("metadata") or {}
        return {**meta, "auth": custom.get("auth") or [], "identity": custom.get("identity")}
    return None


@dataclass
class ScaleModel:
    """One revision's replica count over time. Feed it arrivals and queue readings; ask
    :meth:`decide` for the count now."""

    settings: ScaleSettings
    clock: Callable[[], float]
    http_window: float = HTTP_WINDOW
    #: HTTP arrivals not yet counted into a window.
    _arrivals: collections.deque[float] = field(default_factory=collections.deque)
    _window_start: float = 0.0
    _http_desired: int = 0
    _last_poll: float = -math.inf
    _queue_desired: int = 0
    #: When the metrics last asked for more than the minimum, and the desired counts seen
    #: since (time, count), for the stabilization window.
    _last_active: float = -math.inf
    _history: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    #: How many times each rule was evaluated (tests read them).
    http_evaluations: int = 0
    queue_polls: int = 0
    #: The current scale-up period: when it began and the replicas running then.
    _up_start: float = -math.inf
    _up_base: int = 0

    def __post_init__(self) -> None:
        # A new revision starts a replica (it is ready when one is) and counts as an event:
        # with minReplicas 0 it scales to zero a cooldown later.
        self._window_start = self._last_active = self.clock()

    def arrival(self) -> None:
        self._arrivals.append(self.clock())

    def wake(self) -> None:
        """A request reached an app with no replica: the platform activates it at once (the
        request itself counts at the next window)."""
        self._last_active = self.clock()
        self._http_desired = max(self._http_desired, 1)

    def queue_due(self) -> bool:
        return self.settings.queue_target is not None and self.clock() - self._last_poll >= self.settings.polling

    def queue_reading(self, messages: int | None) -> None:
        """The queue's message count at a poll; None: the read failed, and the rule then asks
        for nothing (the harder case: KEDA's behaviour on a failing scaler without a fallback
        is not documented for Container Apps)."""
        self._last_poll = self.clock()
        self.queue_polls += 1
        target = self.settings.queue_target or 1
        self._queue_desired = 0 if not messages else math.ceil(messages / target)

    def _evaluate_http(self, now: float) -> None:
        if self.settings.http_target is None:
            return
        while now - self._window_start >= self.http_window:
            end = self._window_start + self.http_window
            n = 0
            while self._arrivals and self._arrivals[0] < end:
                self._arrivals.popleft()
                n += 1
            rate = n / self.http_window  # "requests in the past 15 seconds divided by 15"
            self._http_desired = math.ceil(rate / self.settings.http_target) if rate > 0 else 0
            self._window_start = end
            self.http_evaluations += 1

    def decide(self, current: int) -> int:
        """The replica count now, given ``current`` replicas running (or starting)."""
        now = self.clock()
        self._evaluate_http(now)
        s = self.settings
        wanted = max(self._http_desired, self._queue_desired)
        if wanted > 0:
            self._last_active = now
        wanted = min(s.max_replicas, max(s.min_replicas, wanted))
        self._history.append((now, wanted))
        while self._history and now - self._history[0][0] > s.cooldown:
            self._history.popleft()
        if wanted > current:
            if now - self._up_start >= self.http_window:  # a new scale-up period
                self._up_start, self._up_base = now, current
            base = self._up_base
            return max(current, min(wanted, max(base + 4, 2 * base)))
        if now - self._last_active < s.cooldown:
            # Scaling in, but not below the most asked for in the stabilization window, nor to
            # the minimum before cooldownPeriod since the last event.
            floor = max(c for _t, c in self._history)
            return min(current, max(floor, 1 if current else 0, s.min_replicas))
        return max(wanted, s.min_replicas) if wanted < current else current
