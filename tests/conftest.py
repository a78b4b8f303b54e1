"""Shared fixtures: workspaces with keys, a client that speaks Segment, a real Celery worker.

The suite runs against whatever DATABASE_URL / REDIS_URL say: PostgreSQL + Redis in CI,
SQLite with in-process tasks by default.
"""

import base64
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client

from bench.stack import celery_worker_argv
from kana.models import Workspace
from kana.services import _key_cache, api_key_issue

from .wsgi_client import WsgiClient

ROOT = Path(__file__).resolve().parent.parent


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


requires_postgres = pytest.mark.skipif(
    "postgresql" not in settings.DATABASES["default"]["ENGINE"],
    reason="needs PostgreSQL (row locks and real parallel connections); set DATABASE_URL",
)
requires_broker = pytest.mark.skipif(
    not settings.REDIS_URL or "postgresql" not in settings.DATABASES["default"]["ENGINE"],
    reason="needs Redis and PostgreSQL for a real Celery worker; set REDIS_URL and DATABASE_URL",
)


@dataclass
class Tenant:
    workspace: Workspace
    key: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.key}:".encode()).decode()


def make_tenant(name: str = "Acme") -> Tenant:
    workspace = Workspace.objects.create(name=name)
    return Tenant(workspace=workspace, key=api_key_issue(workspace=workspace).raw_key)


@pytest.fixture(autouse=True)
def _fresh_key_cache():
    _key_cache.clear()
    yield
    _key_cache.clear()


@pytest.fixture(autouse=True)
def _fresh_rule_cache():
    # The per-process rule cache is keyed by (workspace id, rules_version). A rolled-back test
    # database hands the next test the same ids and versions (SQLite reuses them), so a
    # stale rule set would be taken for the current one.
    from features.mapping import _cache

    _cache.clear()
    yield
    _cache.clear()


@pytest.fixture
def tenant(db) -> Tenant:
    return make_tenant("Acme")


@pytest.fixture
def other_tenant(db) -> Tenant:
    return make_tenant("Other Co")


# The two routes to the ingest endpoints: Django's views through its test client, and
# gunicorn's entry (kana.wsgi.application), where the lean WSGI app answers them.
INGEST_ROUTES = {"django": Client, "lean": WsgiClient}
_ingest_route = ["django"]  # the route SegmentClient takes, set by the ingest_route fixture


@pytest.fixture(params=list(INGEST_ROUTES))
def ingest_route(request):
    """Runs the test once per ingest route; every SegmentClient it makes takes that route."""
    _ingest_route[0] = request.param
    yield request.param
    _ingest_route[0] = "django"


_api_route = ["django"]  # the route ApiClient takes, set by the api_route fixture


@pytest.fixture(params=list(INGEST_ROUTES))
def api_route(request):
    """Runs the test once per route to the REST API (Django's test client, or gunicorn's entry,
    where the lean front answers the entitlement check and consume); every ApiClient it makes
    takes that route."""
    _api_route[0] = request.param
    yield request.param
    _api_route[0] = "django"


def api_client(**defaults) -> Client:
    """A test client on the current REST API route (Django's by default, see ``api_route``)."""
    return INGEST_ROUTES[_api_route[0]](**defaults)


def ingest_client(**defaults) -> Client:
    """A test client on the current ingest route (Django's by default, see ``ingest_route``)."""
    return INGEST_ROUTES[_ingest_route[0]](**defaults)


class SegmentClient:
    """Posts Segment messages the way Segment's libraries do (Basic auth, JSON)."""

    def __init__(self, tenant: Tenant):
        self.tenant = tenant
        self.client = ingest_client()

    def post(self, path: str, body, *, auth: str | None = None, **headers):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers.setdefault("HTTP_AUTHORIZATION", auth if auth is not None else self.tenant.basic())
        return self.client.post(path, data=data, content_type="application/json", **headers)

    def identify(self, user_id, traits=None, **fields):
        return self.post("/v1/identify", {"userId": user_id, "traits": traits or {}, **fields})

    def track(self, user_id, event, properties=None, **fields):
        return self.post("/v1/track", {"userId": user_id, "event": event, "properties": properties or {}, **fields})

    def batch(self, messages, **fields):
        return self.post("/v1/batch", {"batch": messages, **fields})


@pytest.fixture
def exports_and_seats(tenant):
    """Two consumable features of the tenant, ``exports`` then ``seats``, as the API tests make them."""
    from .api_support import feature

    return feature(tenant, "exports"), feature(tenant, "seats")


@pytest.fixture
def segment(tenant, ingest_route) -> SegmentClient:
    return SegmentClient(tenant)


def database_url_for_subprocess() -> str:
    """The URL of the database the tests are using right now (the test database)."""
    db = connection.settings_dict
    if connection.vendor != "postgresql":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "root"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


class WorkerProcess:
    """A real ``celery worker`` (with beat, for the sweeper) in its own process."""

    def __init__(self, redis_url: str, extra_env: dict | None = None):
        self.redis_url = redis_url
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = ROOT / "var" / f"test-worker-{os.getpid()}-{time.monotonic_ns()}.log"

    def start(self) -> "WorkerProcess":
        self.log_path.parent.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "DATABASE_URL": database_url_for_subprocess(),
            "REDIS_URL": self.redis_url,
            "KANA_JOB_STALE_SECONDS": "3",
            "KANA_SWEEP_INTERVAL_SECONDS": "1",
            "DB_CONN_MAX_AGE": "0",
            **self.extra_env,
        }
        schedule = ROOT / "var" / f"beat-schedule-{os.getpid()}-{time.monotonic_ns()}"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            celery_worker_argv("-B", "-s", str(schedule), loglevel="INFO"),
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """A warm shutdown; a kill if the worker is still there 30 s later.

        This worker runs beat inside it (``-B``, for the sweepers; production runs beat on its
        own, README). Once, in CI, such a worker did not finish its warm shutdown after its
        broker had gone down and come back (test_reprocessing_faults.py's Redis outage: the
        test had passed, its teardown failed on the wait). Its log's tail is printed then, so
        the hang stays visible without failing a test whose assertions all held.
        """
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            print(f"worker {self.process.pid} still running 30 s after SIGTERM; killed. Its log ends:")
            print(self.output()[-2000:])
            self.kill(signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def celery_worker(transactional_db):
    """Start a real worker against the test database; the broker queue is purged first."""
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    worker = WorkerProcess(settings.REDIS_URL).start()
    yield worker
    worker.stop()


@pytest.fixture
def workers(transactional_db):
    """Start workers on demand (with extra environment); all are stopped at the end."""
    started: list[WorkerProcess] = []

    def start(redis_url: str = settings.REDIS_URL, **extra_env) -> WorkerProcess:
        worker = WorkerProcess(redis_url, extra_env={k: str(v) for k, v in extra_env.items()}).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_until(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


# --- Dashboard: admins (Django users that are workspace members) and a real browser ------

CHROMIUM = Path("/usr/bin/chromium")
ADMIN_PASSWORD = "correct horse battery staple"


def make_member(workspace: Workspace, username: str = "ada"):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(username=username, password=ADMIN_PASSWORD)
    workspace.members.add(user)
    return user


@pytest.fixture
def member(tenant):
    """A dashboard login that belongs to ``tenant``'s workspace only."""
    return make_member(tenant.workspace)


@pytest.fixture
def member_client(member) -> Client:
    client = Client()
    client.force_login(member)
    return client


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser)."""
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (apt-get install chromium): browser tests skipped")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; Django's ORM calls made by the
    # test itself are still synchronous and safe.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(transactional_db, browser, live_server, monkeypatch):
    # The live server answers a keep-alive browser connection in one long-lived thread; with
    # persistent connections that thread would still hold a database session when the test
    # database is dropped. Close it after every request instead.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=live_server.url)
    context.set_default_timeout(15_000)
    opened = context.new_page()
    yield opened
    context.close()
    _wait_for_request_threads()


def _wait_for_request_threads(timeout: float = 5) -> None:
    """Let the live server's request threads end while the test database is still theirs.

    Each kept-alive connection has its own thread, which ends once the client closes it; one
    outliving its test would touch the database of the next (or a dropped) one.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any("process_request_thread" in thread.name for thread in threading.enumerate()):
            return
        time.sleep(0.05)


@pytest.fixture
def tasks_in_process():
    """Celery tasks run in this process when enqueued, as on SQLite, even with REDIS_URL set.

    For tests of the reprocessing logic that need no worker: the job runs at enqueue, i.e. on
    commit (use ``django_capture_on_commit_callbacks(execute=True)`` under the ``db`` fixture).
    """
    from kana.celery import app

    saved = app.conf.task_always_eager, app.conf.task_eager_propagates
    app.conf.task_always_eager, app.conf.task_eager_propagates = True, True
    yield
    app.conf.task_always_eager, app.conf.task_eager_propagates = saved
