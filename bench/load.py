"""The load generator: a standard-library asyncio HTTP/1.1 client, run as its own process.

    python bench/load.py < spec.json > result.json

The spec names the target, the number of connections, a warm-up and a measured window, and
the kind of messages to send (``track``, ``identify_mix``, ``batch``, ``entitlement_check``,
``consume``). Every request carries a fresh messageId (or idempotency key) derived from
``prefix`` and a sequence number, so the harness can check afterwards that each message sent
was stored exactly once. With ``count_true`` (a JSON field such as ``recorded``), the answers
whose field is true are counted per kind.

Connections are kept alive when the server allows it (HTTP/1.1); gunicorn's sync workers
close after every response, and the client then reconnects, as any client of such a server
must. Latency runs from the first byte written (connecting included) to the last byte read.
Requests are not retried: a connection error is counted and makes the scenario fail.

Two ways to offer load:

- **closed loop** (the default): ``connections`` clients, each sending its next request
  when the previous one is answered. Measures the maximum throughput; its latency is only
  connections / throughput.
- **open loop** (``rate`` in the spec, requests per second): requests are *scheduled* at
  fixed intervals whatever the server does, each sent on a connection of its own as soon as
  its time comes (at most ``max_in_flight`` at once; one that must wait for a free slot
  keeps waiting on the clock). Latency runs from the scheduled time, not the send time, so
  a stalled server is charged for every request it delayed (no coordinated omission).
"""

import asyncio
import json
import os
import sys
import time
from collections import Counter

# --- Message factories: each returns (body, tag) for sequence number n, or None when done. ---


def _template(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


class TrackFactory:
    """One track message per request, mapped straight by ``properties.featureId``."""

    def __init__(self, prefix: str, params: dict):
        self.users = params.get("users", 1000)
        self.template = _template(
            {
                "type": "track",
                "event": "Report Exported",
                "userId": "@UID@",
                "messageId": "@MID@",
                "timestamp": "2026-01-15T10:00:00.000Z",
                "properties": {"featureId": params.get("feature", "reports"), "delta": 1, "format": "pdf"},
                "context": {
                    "library": {"name": "analytics-node", "version": "6.2.0"},
                    "ip": "203.0.113.7",
                    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Bench",
                },
            }
        )
        self.prefix = prefix

    def __call__(self, n: int):
        body = self.template.replace("@MID@", f"{self.prefix}-{n}").replace("@UID@", f"u{n % self.users}")
        return body.encode(), "track"


class IdentifyMixFactory:
    """Identify calls cycling through create, update, claim and merge (Kana cases 1/5, 8, 7).

    The harness seeds the users these need: ``upd-K`` (userId and email) to update,
    bare users ``claim-K@`` to be claimed, and pairs ``mrg-K`` (no email) + bare ``mrgbare-K@``
    to be merged. Each claim and merge target is used once; when a pool is used up the
    factory stops (the harness sizes the pools well beyond what a run can use).
    """

    KINDS = ("create", "update", "claim", "merge")

    def __init__(self, prefix: str, params: dict):
        self.prefix = prefix
        self.update_pool = params["update_pool"]
        self.claim_pool = params["claim_pool"]
        self.merge_pool = params["merge_pool"]
        self.next = Counter()

    def __call__(self, n: int):
        kind = self.KINDS[n % 4]
        k = self.next[kind]
        self.next[kind] += 1
        if kind == "create":
            user_id = f"{self.prefix}-new-{k}"
            traits = {"name": f"New {k}", "email": f"{user_id}@example.com"}
        elif kind == "update":
            j = k % self.update_pool
            user_id, traits = f"upd-{j}", {"name": f"Updated {k}", "email": f"upd-{j}@example.com"}
        elif kind == "claim":
            if k >= self.claim_pool:
                return None
            user_id, traits = f"{self.prefix}-claim-{k}", {"name": f"Claimer {k}", "email": f"claim-{k}@example.com"}
        else:
            if k >= self.merge_pool:
                return None
            user_id, traits = f"mrg-{k}", {"email": f"mrgbare-{k}@example.com"}
        message = {"type": "identify", "userId": user_id, "messageId": f"{self.prefix}-{n}", "traits": traits}
        return json.dumps(message, separators=(",", ":")).encode(), kind


class BatchFactory:
    """``/v1/batch`` bodies of ``size`` track messages; rules map half of them.

    Per four messages: one matched by an event-name rule, one by a property rule, one that
    only misses the property condition, one no rule names.
    """

    def __init__(self, prefix: str, params: dict):
        self.size = params.get("size", 100)
        self.users = params.get("users", 1000)
        shapes = [
            ("Report Exported", {"format": "pdf", "plan": {"tier": "pro"}}),
            ("Dashboard Viewed", {"plan": {"tier": "enterprise"}, "widgets": 4}),
            ("Dashboard Viewed", {"plan": {"tier": "free"}, "widgets": 2}),
            ("Page Scrolled", {"depth": 0.5}),
        ]
        # Every "@X@" is a slot filled per request: per message its userId, then the batch
        # number in its messageId (dict order). A body then costs a join, not a JSON encoding.
        batch = [
            {
                "type": "track",
                "event": shapes[i % 4][0],
                "userId": "@X@",
                "messageId": f"{prefix}-@X@-{i}",
                "timestamp": "2026-01-15T10:00:00.000Z",
                "properties": shapes[i % 4][1],
            }
            for i in range(self.size)
        ]
        body = _template({"batch": batch, "context": {"library": {"name": "analytics-python", "version": "2.3.3"}}})
        self.parts = body.split("@X@")

    def __call__(self, n: int):
        batch_number = str(n)
        base = n * self.size
        values = []
        for i in range(self.size):
            values.append(f"u{(base + i) % self.users}")
            values.append(batch_number)
        body = self.parts[0] + "".join(v + p for v, p in zip(values, self.parts[1:], strict=True))
        return body.encode(), "batch"


class EntitlementCheckFactory:
    """``GET /api/v1/entitlements/check`` for one of ``users`` subscribed users (``u0``...), each
    request a query string: the factory's ``method`` is GET, so its "body" is the query."""

    method = "GET"

    def __init__(self, prefix: str, params: dict):
        self.users = params.get("users", 1000)
        self.feature = params.get("feature", "messages")

    def __call__(self, n: int):
        return f"?user_id=u{n % self.users}&feature={self.feature}&delta=1".encode(), "check"


class ConsumeFactory:
    """``POST /api/v1/entitlements/consume`` of 1, keyed ``<prefix>-<n>`` (unique per request).

    Connections below ``hot_connections`` all consume on one subject (``hot_user``, whose budget
    runs out during the run: contention on its lock); the others spread over ``users`` users.
    """

    per_connection = True

    def __init__(self, prefix: str, params: dict):
        self.prefix = prefix
        self.users = params.get("users", 1000)
        self.hot_user = params.get("hot_user", "hot")
        self.hot_connections = params.get("hot_connections", 8)
        self.feature = params.get("feature", "messages")

    def __call__(self, n: int, connection: int = 0):
        hot = connection < self.hot_connections
        user_id = self.hot_user if hot else f"u{n % self.users}"
        body = {"user_id": user_id, "feature": self.feature, "delta": 1, "idempotency_key": f"{self.prefix}-{n}"}
        return json.dumps(body, separators=(",", ":")).encode(), "hot" if hot else "spread"


FACTORIES = {
    "track": TrackFactory,
    "identify_mix": IdentifyMixFactory,
    "batch": BatchFactory,
    "entitlement_check": EntitlementCheckFactory,
    "consume": ConsumeFactory,
}


# --- The HTTP client ---------------------------------------------------------------------


class _ResponseProtocol(asyncio.Protocol):
    """Reads one response at a time: status, Content-Length body, and whether it closes."""

    def __init__(self):
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        self._check()

    def connection_lost(self, exc):
        self.closed = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before the response ended"))

    def _check(self):
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length, close = 0, False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                close = value.strip().lower() == "close"
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        self.waiter.set_result((status, close, body))

    async def request(self, data: bytes):
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        self._check()
        return await self.waiter


class Run:
    def __init__(self, spec: dict):
        self.spec = spec
        self.factory = FACTORIES[spec["kind"]](spec["prefix"], spec.get("params", {}))
        self.method = getattr(self.factory, "method", "POST")
        headers = f"Host: {spec['host']}:{spec['port']}\r\n" + (
            f"Authorization: {spec['auth']}\r\n" if spec.get("auth") else ""
        )
        if self.method == "GET":  # the factory's "body" is the query string
            self.head = f"GET {spec['path']}%s HTTP/1.1\r\n{headers}\r\n".encode()
        else:
            self.head = (
                f"POST {spec['path']} HTTP/1.1\r\n{headers}"
                + "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            ).encode()
        # ``count_true``: a JSON field of the answers (say "recorded") whose true values are
        # counted per kind, for the harness to compare with what was stored.
        self.count_true = spec.get("count_true")
        self.true_tags = Counter()
        self.seq = 0
        self.issued = 0
        self.stop = False
        self.exhausted = False
        self.status_counts = Counter()
        self.ok_tags = Counter()
        self.errors = Counter()
        self.latencies: list[float] = []
        # Open loop: (latency, due, send lag, connect, answer) per request of the window, to
        # say where the slowest ones spent their time and when they were due.
        self.timings: list[tuple[float, float, float, float, float]] = []
        # perf_counter -> wall clock, so the slowest requests can be set beside the server's logs.
        self.epoch = time.time() - time.perf_counter()
        self.completed_in_window = 0
        self.window_start = self.window_end = 0.0
        self.max_requests = spec.get("max_requests")

    def request_bytes(self, body: bytes) -> bytes:
        if self.method == "GET":
            return self.head % body
        return self.head % len(body) + body

    def answered(self, status: int, body: bytes, tag: str) -> None:
        self.status_counts[status] += 1
        if 200 <= status < 300:
            self.ok_tags[tag] += 1
            if self.count_true and json.loads(body).get(self.count_true) is True:
                self.true_tags[tag] += 1

    def next_body(self, connection: int = 0):
        if self.max_requests is not None and self.seq >= self.max_requests:
            return None
        if getattr(self.factory, "per_connection", False):
            made = self.factory(self.seq, connection)
        else:
            made = self.factory(self.seq)
        if made is None:
            self.exhausted = True
            return None
        self.seq += 1
        return made

    async def connection(self, index: int):
        loop = asyncio.get_running_loop()
        protocol = None
        while not self.stop:
            made = self.next_body(index)
            if made is None:
                return
            body, tag = made
            self.issued += 1
            started = time.perf_counter()
            try:
                if protocol is None or protocol.closed:
                    _, protocol = await loop.create_connection(_ResponseProtocol, self.spec["host"], self.spec["port"])
                status, close, answer = await protocol.request(self.request_bytes(body))
            except (OSError, ConnectionError) as exc:
                self.errors[type(exc).__name__] += 1
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.close()
                protocol = None
                continue
            finished = time.perf_counter()
            self.answered(status, answer, tag)
            if self.window_start <= started and finished <= self.window_end:
                self.completed_in_window += 1
                self.latencies.append(finished - started)
            if close:
                protocol.transport.close()
                protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    async def scheduled(self, semaphore: asyncio.Semaphore, due: float, made) -> None:
        """One open-loop request, due at ``due``: latency counts from then."""
        loop = asyncio.get_running_loop()
        body, tag = made
        async with semaphore:
            protocol = None
            sent = time.perf_counter()
            try:
                _, protocol = await loop.create_connection(_ResponseProtocol, self.spec["host"], self.spec["port"])
                connected = time.perf_counter()
                status, _close, answer = await protocol.request(self.request_bytes(body))
            except (OSError, ConnectionError) as exc:
                self.errors[type(exc).__name__] += 1
                return
            finally:
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.close()
        finished = time.perf_counter()
        self.answered(status, answer, tag)
        if self.window_start <= due:  # every request due in the window counts, however late
            self.completed_in_window += 1
            self.latencies.append(finished - due)
            self.timings.append((finished - due, due, sent - due, connected - sent, finished - connected))

    async def open_loop(self) -> dict:
        """Requests at ``rate`` per second from a fixed schedule (see the module docstring)."""
        rate = float(self.spec["rate"])
        semaphore = asyncio.Semaphore(self.spec.get("max_in_flight", 256))
        start = time.perf_counter()
        self.window_start = start + self.spec.get("warmup", 0)
        self.window_end = self.window_start + self.spec["duration"]
        tasks, n = [], 0
        while True:
            due = start + n / rate
            if due >= self.window_end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            made = self.next_body()
            if made is None:
                break
            self.issued += 1
            tasks.append(asyncio.create_task(self.scheduled(semaphore, due, made)))
            n += 1
        await asyncio.gather(*tasks)
        in_window = self.completed_in_window
        report = self.report()
        report["offered_rate"] = rate
        report["scheduled_in_window"] = sum(1 for i in range(n) if start + i / rate >= self.window_start)
        report["completed_in_window"] = in_window
        report.update(self.where_the_time_went())
        self.write_timings()
        return report

    def write_timings(self) -> None:
        """Every open-loop request of the window as (due wall-clock time, latency, send lag,
        connect, answer), in seconds, to the file named by ``$KANA_BENCH_TIMINGS``: to set the
        slow requests beside a sampler's per-process counters (major faults, say). Off unless
        that variable is set; the report's ``slowest`` keeps the ten slowest either way."""
        path = os.environ.get("KANA_BENCH_TIMINGS")
        if not path or not self.timings:
            return
        rows = [
            [round(self.epoch + due, 4), *(round(t, 5) for t in (latency, lag, connect, answer))]
            for latency, due, lag, connect, answer in self.timings
        ]
        with open(path, "w") as out:
            json.dump({"fields": ["due", "latency", "send_lag", "connect", "answer"], "rows": rows}, out)

    SLOWEST = 10

    def where_the_time_went(self) -> dict:
        """The open loop's tail, taken apart: the client's own lag (from a request's scheduled
        time until this process began to connect: a busy client, not the server), the connect
        (the listen queue: no worker free to accept), and the answer (a worker's time on it);
        and the slowest requests of the window with the wall-clock time they were due."""
        if not self.timings:
            return {}

        def p99(values) -> float:
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2)

        slowest = sorted(self.timings, reverse=True)[: self.SLOWEST]
        return {
            "send_lag_p99_ms": p99(t[2] for t in self.timings),
            "over_10ms": sum(1 for t in self.timings if t[0] > 0.010),
            "connect_p99_ms": p99(t[3] for t in self.timings),
            "answer_p99_ms": p99(t[4] for t in self.timings),
            "slowest": [
                {
                    "due": _clock(self.epoch + due),
                    "latency_ms": round(latency * 1000, 1),
                    "send_lag_ms": round(lag * 1000, 1),
                    "connect_ms": round(connect * 1000, 1),
                    "answer_ms": round(answer * 1000, 1),
                }
                for latency, due, lag, connect, answer in slowest
            ],
        }

    async def main(self) -> dict:
        if self.spec.get("rate"):
            return await self.open_loop()
        now = time.perf_counter()
        self.window_start = now + self.spec.get("warmup", 0)
        self.window_end = self.window_start + self.spec["duration"]
        tasks = [asyncio.create_task(self.connection(i)) for i in range(self.spec["connections"])]

        async def timer():
            await asyncio.sleep(self.window_end - time.perf_counter())
            self.stop = True

        stopper = asyncio.create_task(timer())
        await asyncio.gather(*tasks)
        stopper.cancel()
        return self.report()

    def report(self) -> dict:
        latencies = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)

        window = self.window_end - self.window_start
        cpu = os.times()
        return {
            "issued": self.issued,
            "ok": sum(self.ok_tags.values()),
            "ok_by_kind": dict(self.ok_tags),
            "true_by_kind": dict(self.true_tags),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "connection_errors": dict(self.errors),
            "exhausted": self.exhausted,
            "window_seconds": round(window, 3),
            "completed_in_window": self.completed_in_window,
            "requests_per_second": round(self.completed_in_window / window, 1) if window else None,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
            "client_cpu_seconds": round(cpu.user + cpu.system, 2),
        }


def _clock(seconds: float) -> str:
    """A wall-clock time as HH:MM:SS.mmm (UTC), as PostgreSQL's log and the harness print it."""
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}"


def main() -> None:
    spec = json.load(sys.stdin)
    result = asyncio.run(Run(spec).main())
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
