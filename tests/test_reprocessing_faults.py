"""Reprocessing survives real faults: a worker SIGKILLed mid-job, and Redis down at rule creation.

Real processes only: Celery workers started with ``WorkerProcess`` and, for the broker
outage, a private ``redis-server`` on a free port (the shared Redis is never stopped).
"""

import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest
import redis
from django.conf import settings

from features.models import Event, EventStatus, ReprocessingJob, Usage
from kana.jobs import JobStatus
from tests.conftest import ROOT, SegmentClient, requires_broker, wait_until
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events, usage_count

PRO = [{"property": "plan.tier", "operator": "equals", "value": "pro"}]


def _job(rule) -> ReprocessingJob:
    return ReprocessingJob.objects.filter(rule=rule).latest("pk")


def _store_many(workspace, count: int) -> None:
    """``count`` stored unmapped events, half of them on the pro plan, bulk-inserted."""
    user = make_user(workspace, "heavy-user")
    for start in range(0, count, 10_000):
        specs = [
            ("Report Exported", {"plan": {"tier": "pro" if i % 2 == 0 else "free"}, "n": i})
            for i in range(start, min(count, start + 10_000))
        ]
        store_unmapped_events(workspace, user, specs, prefix=f"bulk-{start}")


@requires_broker
def test_a_worker_killed_mid_job_is_finished_by_another_without_double_counting(workers, tenant):
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    total = 40_000
    _store_many(tenant.workspace, total)
    make_feature(tenant.workspace, "pro-exports")
    first = workers(KANA_REPROCESS_CHUNK_SIZE=500)
    rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)

    wait_until(lambda: _job(rule).scanned >= 3000, timeout=120, interval=0.05, message="the first chunks committed")
    first.kill(signal.SIGKILL)
    killed = _job(rule)
    assert killed.status == JobStatus.RUNNING and killed.scanned < total, first.output()[-2000:]
    # What is committed is consistent: counters and usage moved together, chunk by chunk.
    assert usage_count(tenant.workspace, "pro-exports") == killed.mapped
    assert killed.scanned % 500 == 0 and killed.cursor > 0

    second = workers(KANA_REPROCESS_CHUNK_SIZE=500)
    wait_until(lambda: _job(rule).status == JobStatus.DONE, timeout=240, message="the second worker finished the job")
    job = _job(rule)
    assert (job.scanned, job.mapped) == (total, total // 2), second.output()[-2000:]
    assert usage_count(tenant.workspace, "pro-exports") == total // 2
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == total // 2
    assert Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).count() == total // 2


@requires_broker
def test_a_worker_killed_while_running_a_rules_parts_leaves_them_to_another_exactly_once(workers, tenant, settings):
    """The same with the job in two parts sharing the range a slice at a time: the killed
    worker's part keeps the slice it claimed (its row records it), the successor resumes it
    and claims the rest, and every event is mapped once."""
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    settings.KANA_REPROCESS_CHUNK_SIZE = 500
    settings.KANA_REPROCESS_PART_MIN_CHUNKS = 1
    total = 20_000
    _store_many(tenant.workspace, total)
    make_feature(tenant.workspace, "pro-exports")
    first = workers(KANA_REPROCESS_CHUNK_SIZE=500)
    rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
    parts = lambda: list(ReprocessingJob.objects.filter(rule=rule).order_by("pk"))  # noqa: E731
    assert len(parts()) == 2

    wait_until(lambda: sum(p.scanned for p in parts()) >= 3000, timeout=120, interval=0.05, message="chunks")
    first.kill(signal.SIGKILL)
    killed = parts()
    assert sum(p.scanned for p in killed) < total, first.output()[-2000:]
    assert usage_count(tenant.workspace, "pro-exports") == sum(p.mapped for p in killed)
    # Every claimed slice is one chunk of candidates, walked in whole chunks.
    assert all(p.slice_end is not None and p.scanned % 500 == 0 for p in killed)

    second = workers(KANA_REPROCESS_CHUNK_SIZE=500)
    wait_until(
        lambda: all(p.status == JobStatus.DONE for p in parts()), timeout=240, message="the second worker finished"
    )
    done = parts()
    assert (sum(p.scanned for p in done), sum(p.mapped for p in done)) == (total, total // 2), second.output()[-2000:]
    assert usage_count(tenant.workspace, "pro-exports") == total // 2
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == total // 2
    assert Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).count() == total // 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test's own, stopped and started again on the same port."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "PrivateRedis":
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(ROOT / "var"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=10, message="private redis-server up")
        return self

    def _answers(self) -> bool:
        try:
            return redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@contextmanager
def publishing_to(broker_url: str):
    """Point this process's Celery app (what ``rule_create`` publishes with) at ``broker_url``."""
    from kana.celery import app

    def reset_pools():
        app._pool = None
        app.amqp._producer_pool = None

    saved = app.conf.broker_url
    app.conf.broker_url = broker_url
    reset_pools()
    try:
        yield
    finally:
        app.conf.broker_url = saved
        reset_pools()


@pytest.fixture
def private_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis().start()
    yield server
    server.stop()


@requires_broker
def test_a_rule_created_while_redis_is_down_is_reprocessed_once_it_is_back(workers, tenant, private_redis):
    segment = SegmentClient(tenant)
    before = [
        {"type": "track", "userId": f"u{i % 3}", "event": "Report Exported", "properties": {"plan": {"tier": t}}}
        for i, t in enumerate(["pro", "free"] * 100)
    ]
    assert segment.batch(before).json()["accepted"] == 200
    make_feature(tenant.workspace, "pro-exports")

    with publishing_to(private_redis.url):
        worker = workers(private_redis.url)
        wait_until(lambda: "ready." in worker.output(), timeout=60, message="worker ready")
        private_redis.stop()

        started = time.monotonic()
        rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
        assert time.monotonic() - started < 3, "creating a rule waited on the unreachable broker"
        assert _job(rule).status == JobStatus.QUEUED

        # Ingest does not depend on the broker: it answers, and maps with the new rule.
        for i in range(20):
            started = time.monotonic()
            response = segment.track("u9", "Report Exported", {"plan": {"tier": "pro"}}, messageId=f"down-{i}")
            assert response.status_code == 200 and response.json()["status"] == "mapped"
            assert time.monotonic() - started < 2

        private_redis.start()  # same port: the worker reconnects, its sweeper re-sends the job
        wait_until(
            lambda: _job(rule).status == JobStatus.DONE, timeout=120, message="reprocessing after the broker returned"
        )

    job = _job(rule)
    assert (job.scanned, job.mapped) == (200, 100), worker.output()[-3000:]
    assert usage_count(tenant.workspace, "pro-exports") == 100 + 20
    assert (
        not Event.objects.filter(workspace=tenant.workspace, payload__properties__plan__tier="pro")
        .exclude(status=EventStatus.MAPPED)
        .exists()
    )
