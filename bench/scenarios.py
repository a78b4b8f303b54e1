"""The baselines and scenarios of BENCH.md, each verified before its figure counts.

Runs inside the harness process (Django set up on the benchmark's own database): it seeds
data, drives the load client process against gunicorn, and checks the stored rows.
"""

import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import psycopg
from django.core.management import call_command, get_commands, load_command_class
from django.db import connection
from django.db.models import Q, Sum

from features.models import Event, EventStatus, Feature, ReprocessingJob, Usage
from features.preview import rule_preview
from features.selectors import Progress, reprocessing_of
from features.services import RuleDefinition, feature_create, rule_create
from kana.jobs import JobStatus
from kana.services import workspace_create_with_key
from users.models import EndUser, MergeRecord

from . import bulk, stack

S1_USERS = 1000
# How long a window's settling waits for an autovacuum worker already on the database.
SETTLE_AUTOVACUUM_WAIT = 60
AUTOVACUUM_HERE = """
    SELECT 1 FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' AND datname = current_database()
"""
# S6/S7: subscribed users spread over, and the one subject half of S7's connections share.
ENTITLEMENT_USERS = 1000
ENTITLEMENT_FEATURE = "messages"
S7_HOT_USER = "hot"
S4_USERS = 10_000
BATCH_SIZE = 100
# S4 creates this rule over its stored events; S8 previews it over the same events first.
S4_RULE = RuleDefinition(
    name="Pro exports",
    feature_key="exports",
    event_name="Report Exported",
    conditions=[{"property": "plan.tier", "operator": "equals", "value": "pro"}],
)
# Identify scenario pools: comfortably more than a run can use at any plausible rate.
S2_POOL_PER_SECOND = 600


def basic_auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


@dataclass
class Tenant:
    workspace: object
    key: str

    @property
    def pk(self) -> int:
        return self.workspace.pk

    @property
    def auth(self) -> str:
        return basic_auth(self.key)


@dataclass
class Row:
    """One line of the result table."""

    id: str
    scenario: str
    unit: str
    value: float | None = None
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    target_ratio: float | None = None  # ratio to the baseline required
    target_max: float | None = None  # absolute ceiling (latency, memory)
    target_min: float | None = None  # absolute floor (CSV rows/s)
    target_seconds: float | None = None  # met also when done within this many seconds (S8)
    verified: bool | None = None
    problems: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    not_run: str = ""  # why the scenario was not run (its feature does not exist yet)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.value is None or self.verified is False:
            return None
        if self.target_seconds is not None and self.details.get("seconds", float("inf")) <= self.target_seconds:
            return True
        if self.target_ratio is not None:
            return self.ratio is not None and self.ratio >= self.target_ratio
        if self.target_max is not None:
            return self.value <= self.target_max
        if self.target_min is not None:
            return self.value >= self.target_min
        return None

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "scenario": self.scenario,
            "value": None if self.value is None else round(self.value, 2),
            "unit": self.unit,
            "baseline": self.baseline or None,
            "baseline_value": None if self.baseline_value is None else round(self.baseline_value, 2),
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "target": self.target or None,
            "met": self.met,
            "verified": self.verified,
            "problems": self.problems,
            "not_run": self.not_run or None,
            "details": self.details,
        }

    def as_scenario(self) -> dict:
        """The short form BENCH.md asks for, plus the absolute figures."""
        return {
            "id": self.id,
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "target": self.target or None,
            "met": self.met,
            "value": None if self.value is None else round(self.value, 2),
            "unit": self.unit,
            "baseline": self.baseline or None,
            "baseline_value": None if self.baseline_value is None else round(self.baseline_value, 2),
            "status": "not run" if self.not_run else ("no result" if self.verified is False else "measured"),
        }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def consume_problems(
    workspace, *, prefix: str, feature, hot_user_pk: int, hot_limit: int, recorded_by_kind: dict
) -> list[str]:
    """What S7's stored usage says against its answers: the hot subject consumed at most its
    limit, and every ``recorded: true`` answer (per kind, hot or spread) is exactly one usage
    row of a consume keyed ``<prefix>-n``, none more. A run with any of these has no result."""
    usage = Usage.objects.for_workspace(workspace).filter(feature=feature, event__message_id__startswith=f"{prefix}-")
    hot = usage.filter(user_id=hot_user_pk)
    hot_used = Decimal(hot.aggregate(total=Sum("amount"))["total"] or 0).normalize()
    problems = []
    if hot_used > hot_limit:
        problems.append(f"overspend: the hot subject used {hot_used} of a limit of {hot_limit}")
    stored = {"hot": hot.count(), "spread": usage.exclude(user_id=hot_user_pk).count()}
    for kind, rows in stored.items():
        answered = recorded_by_kind.get(kind, 0)
        if rows != answered:
            problems.append(f"{kind}: {answered} consumes answered recorded, {rows} usage rows stored")
    return problems


class Bench:
    def __init__(self, *, args, sizes: dict, env: dict, log_dir: Path):
        self.args, self.sizes, self.env, self.log_dir = args, sizes, env, log_dir
        self.only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
        self.rows: list[Row] = []
        self.services: dict[str, stack.Service] = {}
        self.port = stack.free_port()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.bulk_conn: psycopg.Connection | None = None
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]

    def wanted(self, *ids: str) -> bool:
        return not self.only or any(i in self.only for i in ids)

    # --- Lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        self.log("migrating a fresh database")
        call_command("migrate", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            self.server_version = cursor.fetchone()[0]
        self.bulk_conn = psycopg.connect(self.env["DATABASE_URL"].replace("postgres://", "postgresql://"))
        self.seed()
        model = f"gthread, {self.args.threads} threads each" if self.args.threads > 1 else "sync"
        self.log(
            f"starting gunicorn ({self.args.workers} workers, {model}) and a Celery worker "
            f"({stack.WORKER_CONCURRENCY} processes)"
        )
        self.services["app"] = stack.gunicorn(
            self.env, self.port, self.args.workers, self.log_dir, threads=self.args.threads
        )
        self.services["worker"] = stack.celery_worker(self.env, self.log_dir)
        stack.wait_for_http(self.port)
        self.wait_for_jobs(timeout=120)
        if self.args.pause:
            input(f"gunicorn pids {self.services['app'].pids()}; press Enter to start the scenarios ")
        if self.wanted("B-INSERT", "S1", "S2", "S6", "S7"):
            self.b_insert(1)
        if self.wanted("S1"):
            self.s1()
        if self.wanted("S2"):
            self.s2()
        if self.wanted("B-INSERT", "S1", "S2", "S6", "S7"):
            self.b_insert(2)
        if self.wanted("S3", "B-COPY"):
            self.s3()
        if self.wanted("S4", "B-COPY", "B-UPDATE", "S3"):
            self.s4_and_set_baselines()
        if self.wanted("S5"):
            self.s5()
        if self.wanted("S6", "S7"):
            self.entitlement_scenarios()
        self.link_baselines()

    def close(self) -> None:
        for service in self.services.values():
            service.stop()
        if self.bulk_conn is not None:
            self.bulk_conn.close()

    def log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def check_services(self) -> None:
        for name, service in self.services.items():
            if not service.alive():
                raise RuntimeError(f"{name} died:\n{service.tail()}")

    # --- Data -----------------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant:
        issued = workspace_create_with_key(name=f"bench {name}")
        return Tenant(issued.api_key.workspace, issued.raw_key)

    def seed(self) -> None:
        self.log("seeding workspaces, features, rules and users")
        self.t_base = self.tenant("baseline")
        self.t1, self.t2, self.t3 = self.tenant("s1"), self.tenant("s2"), self.tenant("s3")
        self.t4 = self.tenant("s4")
        feature_create(workspace=self.t1.workspace, key="reports")
        feature_create(workspace=self.t3.workspace, key="reports")
        feature_create(workspace=self.t3.workspace, key="dashboards")
        rule_create(
            workspace=self.t3.workspace,
            definition=RuleDefinition(name="Exports", feature_key="reports", event_name="Report Exported"),
        )
        rule_create(
            workspace=self.t3.workspace,
            definition=RuleDefinition(
                name="Enterprise dashboards",
                feature_key="dashboards",
                event_name="Dashboard Viewed",
                conditions=[{"property": "plan.tier", "operator": "equals", "value": "enterprise"}],
            ),
        )
        feature_create(workspace=self.t4.workspace, key="exports")
        for tenant in (self.t1, self.t3):
            bulk.load_users(self.bulk_conn, tenant.pk, ((tenant.pk, f"u{i}", "", "", "") for i in range(S1_USERS)))
        self.s2_pool = int(S2_POOL_PER_SECOND * (self.sizes["warmup"] + self.sizes["duration"]))
        ws, pool = self.t2.pk, self.s2_pool
        bulk.load_users(
            self.bulk_conn,
            ws,
            (
                *((ws, f"mrg-{k}", f"Merging {k}", "", "") for k in range(pool)),
                *((ws, f"upd-{k}", f"User {k}", f"upd-{k}@example.com", "") for k in range(1000)),
                *((ws, None, f"Bare {k}", f"claim-{k}@example.com", f"cus_C{k}") for k in range(pool)),
                *((ws, None, f"Bare {k}", f"mrgbare-{k}@example.com", f"cus_M{k}") for k in range(pool)),
            ),
        )
        bulk.load_users(self.bulk_conn, self.t4.pk, ((self.t4.pk, f"s4-u{i}", "", "", "") for i in range(S4_USERS)))
        if self.args.stored:
            self.preload_history(self.args.stored)
        for table in ("users_enduser", "users_useridentity"):
            bulk.vacuum_analyze(self.bulk_conn, table)

    def preload_history(self, count: int) -> None:
        """``--stored``: each HTTP scenario's workspace starts with ``count`` stored events of
        its own (an event name no rule maps, so no reprocessing picks them up) and one more user
        per 25 events, so a run at 10x data shows whether the cost per request grows with it."""
        self.log(f"storing {count:,} older events and {count // 25:,} more users in each HTTP workspace")
        for tenant in (self.t1, self.t2, self.t3):
            bulk.load_users(
                self.bulk_conn, tenant.pk, ((tenant.pk, f"old-{i}", "", "", "") for i in range(max(1, count // 25)))
            )
            owners = [key for key in bulk.user_keys(self.bulk_conn, tenant.pk) if key[1].startswith("old-")]
            chunks = bulk.unmapped_event_chunks(
                workspace_id=tenant.pk, prefix="old", count=count, users=owners, name="Page Viewed"
            )
            bulk.copy_chunks(self.bulk_conn, "features_event", bulk.EVENT_COLUMNS, chunks)
        bulk.vacuum_analyze(self.bulk_conn, "features_event")

    def wait_for_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while ReprocessingJob.objects.exclude(status__in=[JobStatus.DONE, JobStatus.FAILED]).exists():
            self.check_services()
            if time.monotonic() > deadline:
                raise RuntimeError("set-up reprocessing jobs did not finish")
            time.sleep(0.2)

    # --- HTTP load ------------------------------------------------------------------------

    def load(
        self,
        *,
        path: str,
        kind: str,
        prefix: str,
        auth: str = "",
        params: dict | None = None,
        rate: float = 0,
        count_true: str = "",
    ) -> dict:
        """Drive ``bench/load.py``: closed loop on ``--connections`` connections, or open loop
        at ``rate`` requests per second when given."""
        self.check_services()
        spec = {
            "host": "127.0.0.1",
            "port": self.port,
            "path": path,
            "auth": auth,
            "connections": self.args.connections,
            "warmup": self.sizes["warmup"],
            "duration": self.sizes["duration"],
            "kind": kind,
            "prefix": prefix,
            "params": params or {},
            "rate": rate,
            "count_true": count_true,
        }
        settled = self.settle() if self.args.settle else None
        load_average = round(os.getloadavg()[0], 2)
        started = time.monotonic()
        with self.cpu_meter() as meter, self.profiled("app", prefix):
            done = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("load.py"))],
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                check=True,
            )
        result = json.loads(done.stdout)
        elapsed = time.monotonic() - started
        result["cpu_cores"] = {**meter.cores, "load_client": round(result["client_cpu_seconds"] / elapsed, 2)}
        result["machine_busy_cores"] = meter.machine_busy
        result["load_average_at_start"] = load_average
        result["settle"] = settled
        result["disturbances"] = meter.disturbances
        # CPU per request is much less sensitive to a busy machine than requests per second.
        if result["issued"]:
            result["cpu_ms_per_request"] = {
                name: round(used / result["issued"] * 1000, 2) for name, used in meter.seconds.items() if used
            }
        return result

    def settle(self) -> dict:
        """Before every measured window, baselines included: no scenario pays for the pages an
        earlier one left behind. ``VACUUM (ANALYZE)`` of the database (what autovacuum would
        do after the previous window's writes, so it does not start in this one), then wait
        for any autovacuum worker still on it, then a ``CHECKPOINT`` (the dirty pages of the
        bulk phases and of the previous window are written now, not by a spread checkpoint
        whose writes and fsyncs overlap this window). What still happens during the window
        is reported in its ``disturbances``."""
        started = time.monotonic()
        timings = {}
        with psycopg.connect(self.env["DATABASE_URL"].replace("postgres://", "postgresql://"), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            timings["vacuum_s"] = time.monotonic() - started
            deadline = time.monotonic() + SETTLE_AUTOVACUUM_WAIT
            while time.monotonic() < deadline and conn.execute(AUTOVACUUM_HERE).fetchone():
                time.sleep(0.2)
            timings["autovacuum_wait_s"] = time.monotonic() - started - timings["vacuum_s"]
            conn.execute("CHECKPOINT")
        timings["checkpoint_s"] = time.monotonic() - started - timings["vacuum_s"] - timings["autovacuum_wait_s"]
        return {name: round(seconds, 2) for name, seconds in timings.items()}

    def cpu_meter(self) -> stack.CpuMeter:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            harness = {cursor.fetchone()[0], self.bulk_conn.info.backend_pid}
        return stack.CpuMeter(self.services, self.env["DATABASE_URL"], harness)

    def profiled(self, service: str, name: str):
        """py-spy on a service for the duration of the block, when --profile is given."""
        if not self.args.profile:
            return contextlib.nullcontext()
        directory = Path(self.args.profile)
        directory.mkdir(parents=True, exist_ok=True)
        pid = self.services[service].process.pid
        return stack.Profiler(pid, directory / f"{name}.txt", subprocesses=True)  # gunicorn and prefork children

    @staticmethod
    def http_problems(result: dict) -> list[str]:
        problems = []
        bad = {k: v for k, v in result["status_counts"].items() if not k.startswith("2")}
        if bad:
            problems.append(f"non-2xx responses: {bad}")
        if result["connection_errors"]:
            problems.append(f"connection errors: {result['connection_errors']}")
        if result["exhausted"]:
            problems.append("the seeded pools ran out before the end of the window")
        return problems

    def events_of(self, tenant: Tenant, prefix: str):
        return Event.objects.for_workspace(tenant.workspace).filter(message_id__startswith=f"{prefix}-")

    def exactly_once(self, tenant: Tenant, prefix: str, expected: int) -> list[str]:
        events = self.events_of(tenant, prefix)
        stored = events.count()
        distinct = events.values("message_id").distinct().count()
        problems = []
        if stored != expected or distinct != expected:
            problems.append(f"{expected} messages sent, {stored} events stored ({distinct} distinct messageIds)")
        return problems

    def usage_of(self, tenant: Tenant, prefix: str) -> int:
        return Usage.objects.for_workspace(tenant.workspace).filter(event__message_id__startswith=f"{prefix}-").count()

    # --- Baselines ------------------------------------------------------------------------

    def b_insert(self, round_number: int) -> None:
        prefix = f"b{round_number}"
        self.log(f"B-insert (round {round_number}): one INSERT per POST")
        result = self.load(path=f"/bench/insert/{self.t_base.pk}", kind="track", prefix=prefix)
        problems = self.http_problems(result) + self.exactly_once(self.t_base, prefix, result["issued"])
        self.rows.append(
            Row(
                id=f"B-insert#{round_number}",
                scenario="B-insert: minimal view, 1 INSERT per POST",
                unit="req/s",
                value=result["requests_per_second"] if not problems else None,
                verified=not problems,
                problems=problems,
                details=result,
            )
        )

    # --- S1-S3: ingest over HTTP ----------------------------------------------------------

    def s1(self) -> None:
        self.log("S1: track, one per POST to /segment/events, mapped by featureId")
        result = self.load(
            path="/segment/events", kind="track", prefix="s1", auth=self.t1.auth, params={"users": S1_USERS}
        )
        sent = result["issued"]
        problems = self.http_problems(result) + self.exactly_once(self.t1, "s1", sent)
        mapped = self.events_of(self.t1, "s1").filter(status=EventStatus.MAPPED).count()
        usage = self.usage_of(self.t1, "s1")
        if mapped != sent or usage != sent:
            problems.append(f"{sent} sent, {mapped} mapped events, {usage} usage rows")
        ok = not problems
        self.rows.append(
            Row(
                id="S1",
                scenario="S1 track, 1 msg/POST, featureId",
                unit="req/s",
                value=result["requests_per_second"] if ok else None,
                baseline="B-insert",
                target="≥ 1.0 × B-insert",
                target_ratio=1.0,
                verified=ok,
                problems=problems,
                details=result,
            )
        )
        if ok:
            self.s1_latency(rate=result["requests_per_second"] / 2)

    def s1_latency(self, *, rate: float) -> None:
        """S1-lat: the same tracks offered open loop at half S1's own maximum."""
        self.log(f"S1-lat: the same tracks, open loop at {rate:,.0f} req/s (half of S1's maximum)")
        result = self.load(
            path="/segment/events",
            kind="track",
            prefix="s1lat",
            auth=self.t1.auth,
            params={"users": S1_USERS},
            rate=rate,
        )
        sent = result["issued"]
        problems = self.http_problems(result) + self.exactly_once(self.t1, "s1lat", sent)
        usage = self.usage_of(self.t1, "s1lat")
        if usage != sent:
            problems.append(f"{sent} sent, {usage} usage rows")
        ok = not problems
        self.rows.append(
            Row(
                id="S1-lat",
                scenario=f"S1-lat p99, open loop at {rate:,.0f} req/s",
                unit="ms",
                value=result["p99_ms"] if ok else None,
                target="p99 ≤ 25 ms",
                target_max=25,
                verified=ok,
                problems=problems,
                details=result,
            )
        )

    def s2(self) -> None:
        self.log("S2: identify, one per POST: creates, updates, claims, merges")
        pool = self.s2_pool
        result = self.load(
            path="/segment/events",
            kind="identify_mix",
            prefix="s2",
            auth=self.t2.auth,
            params={"update_pool": 1000, "claim_pool": pool, "merge_pool": pool},
        )
        kinds = result["ok_by_kind"]
        problems = self.http_problems(result) + self.exactly_once(self.t2, "s2", result["issued"])
        users = EndUser.objects.for_workspace(self.t2.workspace)
        checks = {
            "created": (users.filter(user_id__startswith="s2-new-").count(), kinds.get("create", 0)),
            "claimed": (
                users.filter(user_id__startswith="s2-claim-", email__startswith="claim-").count(),
                kinds.get("claim", 0),
            ),
            "merged": (MergeRecord.objects.for_workspace(self.t2.workspace).count(), kinds.get("merge", 0)),
            "bare users left": (
                users.filter(user_id__isnull=True).count(),
                2 * pool - kinds.get("claim", 0) - kinds.get("merge", 0),
            ),
        }
        for name, (found, expected) in checks.items():
            if found != expected:
                problems.append(f"{name}: expected {expected}, found {found}")
        ok = not problems
        result["outcomes"] = {name: found for name, (found, _) in checks.items()}
        self.rows.append(
            Row(
                id="S2",
                scenario="S2 identify mix, 1 msg/POST",
                unit="req/s",
                value=result["requests_per_second"] if ok else None,
                baseline="B-insert",
                target="≥ 0.5 × B-insert",
                target_ratio=0.5,
                verified=ok,
                problems=problems,
                details=result,
            )
        )

    def s3(self) -> None:
        self.log(f"S3: /v1/batch, {BATCH_SIZE} track messages per batch, rules map half")
        result = self.load(
            path="/v1/batch",
            kind="batch",
            prefix="s3",
            auth=self.t3.auth,
            params={"size": BATCH_SIZE, "users": S1_USERS},
        )
        sent = result["issued"] * BATCH_SIZE
        problems = self.http_problems(result) + self.exactly_once(self.t3, "s3", sent)
        usage = self.usage_of(self.t3, "s3")
        mapped = self.events_of(self.t3, "s3").filter(status=EventStatus.MAPPED).count()
        if usage != sent // 2 or mapped != sent // 2:
            problems.append(f"{sent} sent: expected {sent // 2} mapped, found {mapped} mapped and {usage} usage rows")
        ok = not problems
        result["events_per_second"] = result["requests_per_second"] * BATCH_SIZE
        self.rows.append(
            Row(
                id="S3",
                scenario=f"S3 /v1/batch of {BATCH_SIZE}, rules map half",
                unit="events/s",
                value=result["events_per_second"] if ok else None,
                baseline="B-copy",
                target="≥ 0.25 × B-copy",
                target_ratio=0.25,
                verified=ok,
                problems=problems,
                details=result,
            )
        )

    # --- B-copy, B-update and S4: set-based work ------------------------------------------

    def s4_and_set_baselines(self) -> None:
        n = self.sizes["events"]
        conn = self.bulk_conn
        self.log(f"rendering {n:,} event rows for COPY")
        users = bulk.user_keys(conn, self.t4.pk)
        chunks = bulk.unmapped_event_chunks(workspace_id=self.t4.pk, prefix="s4", count=n, users=users)

        self.log(f"B-copy: COPY {n:,} rows into an events-shaped table")
        conn.execute("CREATE TABLE bench_copy_event (LIKE features_event INCLUDING ALL)")
        conn.commit()
        seconds = bulk.copy_chunks(conn, "bench_copy_event", bulk.EVENT_COLUMNS, chunks)
        copied = conn.execute("SELECT count(*) FROM bench_copy_event").fetchone()[0]
        self.rows.append(
            Row(
                id="B-copy",
                scenario="B-copy: psycopg COPY of event rows",
                unit="rows/s",
                value=n / seconds if copied == n else None,
                verified=copied == n,
                details={"rows": n, "seconds": round(seconds, 2)},
            )
        )
        bulk.vacuum_analyze(conn, "bench_copy_event")

        self.log(f"B-update: one UPDATE flipping the status of {n:,} rows")
        started = time.perf_counter()
        updated = conn.execute(
            "UPDATE bench_copy_event SET status = 'mapped', unmapped_reason = '' "
            "WHERE workspace_id = %s AND status = 'unmapped'",
            [self.t4.pk],
        ).rowcount
        conn.commit()
        seconds = time.perf_counter() - started
        self.rows.append(
            Row(
                id="B-update",
                scenario="B-update: 1 UPDATE flipping status",
                unit="rows/s",
                value=n / seconds if updated == n else None,
                verified=updated == n,
                details={"rows": n, "seconds": round(seconds, 2)},
            )
        )
        conn.execute("DROP TABLE bench_copy_event")
        conn.commit()
        if not self.wanted("S4", "S8"):
            return

        self.log(f"S4/S8: loading {n:,} unmapped events (COPY)")
        load_seconds = bulk.copy_chunks(conn, "features_event", bulk.EVENT_COLUMNS, chunks)
        del chunks
        bulk.vacuum_analyze(conn, "features_event")
        bulk.vacuum_analyze(conn, "features_usage")
        if self.wanted("S8"):
            self.s8(n)
        if not self.wanted("S4"):
            return
        self.log(f"S4: creating a rule over {n:,} unmapped events")
        self.check_services()
        with self.cpu_meter() as meter, self.profiled("worker", "s4"):
            started = time.monotonic()
            rule = rule_create(workspace=self.t4.workspace, definition=S4_RULE)
            job, parts = self.wait_for_job(rule, timeout=max(600, n / 500))
            seconds = time.monotonic() - started
        ended = max(p.finished_at or p.heartbeat_at for p in parts)
        job_seconds = (ended - min(p.created_at for p in parts)).total_seconds()
        usage = Usage.objects.for_workspace(self.t4.workspace).count()
        left = Event.objects.for_workspace(self.t4.workspace).filter(status=EventStatus.UNMAPPED).count()
        problems = []
        if job.status != JobStatus.DONE:
            problems.append(f"job ended {job.status}: {job.error}")
        if (job.scanned, job.mapped, usage, left) != (n, n, n, 0):
            problems.append(f"{n} events: job scanned {job.scanned}, mapped {job.mapped}; {usage} usage, {left} left")
        ok = not problems
        self.rows.append(
            Row(
                id="S4",
                scenario=f"S4 rule over {n:,} stored events",
                unit="events/s",
                value=n / seconds if ok else None,
                baseline="B-update",
                target="≥ 0.5 × B-update",
                target_ratio=0.5,
                verified=ok,
                problems=problems,
                details={
                    "events": n,
                    "seconds": round(seconds, 2),
                    "job_seconds": round(job_seconds, 2),
                    "parts": len(parts),
                    # Each part's events and when it ended after the job was created: how evenly
                    # the parts shared the work (the job takes as long as its slowest part).
                    "part_shares": [
                        {
                            "scanned": p.scanned,
                            "ended_after_seconds": round(
                                ((p.finished_at or p.heartbeat_at) - p.created_at).total_seconds(), 2
                            ),
                        }
                        for p in sorted(parts, key=lambda p: p.pk)
                    ],
                    "load_copy_rows_per_second": round(n / load_seconds),
                    "cpu_cores": meter.cores,
                    "cpu_ms_per_1000_events": {
                        name: round(used / n * 1e6, 1) for name, used in meter.seconds.items() if used
                    },
                    "machine_busy_cores": meter.machine_busy,
                },
            )
        )

    def s8(self, n: int) -> None:
        """S8: preview S4's rule over the same stored unmapped events, in this process (the
        preview is a selector the dashboard calls in its request), before S4 creates it."""
        self.log(f"S8: rule preview over {n:,} unmapped events")
        started = time.perf_counter()
        preview = rule_preview(workspace=self.t4.workspace, definition=S4_RULE)
        seconds = time.perf_counter() - started
        problems = []
        if preview.matched_events != n:
            problems.append(f"{n} events match the rule, the preview counted {preview.matched_events}")
        ok = not problems
        self.rows.append(
            Row(
                id="S8",
                scenario=f"S8 rule preview over {n:,} events",
                unit="rows/s",
                value=n / seconds if ok else None,
                baseline="B-update",
                target="≤ 5 s or ≥ 2 × B-update",
                target_ratio=2.0,
                target_seconds=5.0,
                verified=ok,
                problems=problems,
                details={"events": n, "seconds": round(seconds, 3), "matched": preview.matched_events},
            )
        )

    def wait_for_job(self, rule, timeout: float) -> tuple[Progress, list[ReprocessingJob]]:
        """The rule's reprocessing once every part of it ended (or one failed): its progress
        summed as the API shows it, and its parts."""
        deadline = time.monotonic() + timeout
        while True:
            progress = reprocessing_of(rule)
            if progress.job_id is not None and progress.status in (JobStatus.DONE, JobStatus.FAILED):
                first = progress.job_id
                return progress, list(ReprocessingJob.objects.filter(Q(pk=first) | Q(part_of_id=first)))
            self.check_services()
            if time.monotonic() > deadline:
                raise RuntimeError(f"reprocessing did not finish within {timeout:.0f}s")
            time.sleep(0.05)

    # --- S6, S7: entitlement checks and consumes ---------------------------------------

    def entitlement_scenarios(self) -> None:
        """S6 (entitlement check, one GET per request; p99 at half its maximum, open loop) and
        S7 (consume, half the connections on one subject whose budget runs out mid-run; zero
        overspend), on a workspace of their own: ``ENTITLEMENT_USERS`` users subscribed to a
        published package whose consumable feature has a limit no run reaches, and one hot
        subject on a package whose limit the run does reach."""
        self.seed_entitlements()
        if self.wanted("S6"):
            self.s6()
        if self.wanted("S7"):
            self.s7()

    def seed_entitlements(self) -> None:
        from entitlements.models import PackageStatus
        from entitlements.services import PackageFeatureSpec, package_create, subscription_create

        self.t6 = self.tenant("s6 s7")
        workspace = self.t6.workspace
        # The hot subject's budget: about a tenth of what its connections could consume in a
        # run at S7's target (half the connections at 0.5 x B-insert), so it runs out early
        # and most of the run contends on a subject at its limit.
        rate = self.b_insert_figure() or 400
        window = self.sizes["warmup"] + self.sizes["duration"]
        self.s7_hot_limit = max(20, int(rate * 0.5 * 0.5 * window / 10))
        self.log(f"S6/S7: subscribing {ENTITLEMENT_USERS:,} users and one hot subject (limit {self.s7_hot_limit:,})")
        feature_create(workspace=workspace, key=ENTITLEMENT_FEATURE)
        roomy, tight = (
            package_create(
                workspace=workspace,
                key=key,
                status=PackageStatus.PUBLISHED,
                features=[PackageFeatureSpec(feature_key=ENTITLEMENT_FEATURE, limit=Decimal(limit))],
            )
            for key, limit in (("bench", 10**12), ("bench-hot", self.s7_hot_limit))
        )
        bulk.load_users(
            self.bulk_conn,
            self.t6.pk,
            (
                *((self.t6.pk, f"u{i}", "", "", "") for i in range(ENTITLEMENT_USERS)),
                (self.t6.pk, S7_HOT_USER, "", "", ""),
            ),
        )
        for user in EndUser.objects.for_workspace(workspace).exclude(user_id=S7_HOT_USER):
            subscription_create(workspace=workspace, package=roomy, user=user)
        self.s7_hot_user = EndUser.objects.for_workspace(workspace).get(user_id=S7_HOT_USER)
        subscription_create(workspace=workspace, package=tight, user=self.s7_hot_user)
        for table in ("users_enduser", "users_useridentity", "entitlements_subscription"):
            bulk.vacuum_analyze(self.bulk_conn, table)

    def b_insert_figure(self) -> float | None:
        figures = [r.value for r in self.rows if r.id.startswith("B-insert#") and r.value]
        return max(figures) if figures else None

    def s6(self) -> None:
        self.log("S6: entitlement check, one GET per request")
        params = {"users": ENTITLEMENT_USERS, "feature": ENTITLEMENT_FEATURE}
        common = {"path": "/api/v1/entitlements/check", "kind": "entitlement_check", "auth": self.t6.auth}
        result = self.load(prefix="s6", params=params, count_true="access", **common)
        problems = self.http_problems(result) + self.granted_problems(result)
        ok = not problems
        self.rows.append(
            Row(
                id="S6",
                scenario="S6 entitlement check, 1 GET/request",
                unit="req/s",
                value=result["requests_per_second"] if ok else None,
                baseline="B-insert",
                target="≥ 0.9 × B-insert",
                target_ratio=0.9,
                verified=ok,
                problems=problems,
                details=result,
            )
        )
        if not ok:
            return
        rate = result["requests_per_second"] / 2
        self.log(f"S6-lat: the same checks, open loop at {rate:,.0f} req/s (half of S6's maximum)")
        result = self.load(prefix="s6lat", params=params, count_true="access", rate=rate, **common)
        problems = self.http_problems(result) + self.granted_problems(result)
        ok = not problems
        self.rows.append(
            Row(
                id="S6-lat",
                scenario=f"S6-lat p99, open loop at {rate:,.0f} req/s",
                unit="ms",
                value=result["p99_ms"] if ok else None,
                target="p99 ≤ 10 ms",
                target_max=10,
                verified=ok,
                problems=problems,
                details=result,
            )
        )

    @staticmethod
    def granted_problems(result: dict) -> list[str]:
        granted = sum(result["true_by_kind"].values())
        return [] if granted == result["ok"] else [f"{result['ok']} checks answered, {granted} granted access"]

    def s7(self) -> None:
        hot = self.args.connections // 2
        self.log(f"S7: consume, {hot} of {self.args.connections} connections on one subject")
        result = self.load(
            path="/api/v1/entitlements/consume",
            kind="consume",
            prefix="s7",
            auth=self.t6.auth,
            params={
                "users": ENTITLEMENT_USERS,
                "feature": ENTITLEMENT_FEATURE,
                "hot_user": S7_HOT_USER,
                "hot_connections": hot,
            },
            count_true="recorded",
        )
        problems = self.http_problems(result)
        if result["ok"] != result["issued"]:
            problems.append(f"{result['issued']} consumes sent, {result['ok']} answered")
        feature = Feature.objects.for_workspace(self.t6.workspace).get(key=ENTITLEMENT_FEATURE)
        problems += consume_problems(
            self.t6.workspace,
            prefix="s7",
            feature=feature,
            hot_user_pk=self.s7_hot_user.pk,
            hot_limit=self.s7_hot_limit,
            recorded_by_kind=result["true_by_kind"],
        )
        ok = not problems
        recorded_hot = result["true_by_kind"].get("hot", 0)
        result["hot_subject"] = {
            "limit": self.s7_hot_limit,
            "recorded": recorded_hot,
            "refused": result["ok_by_kind"].get("hot", 0) - recorded_hot,
            "budget_ran_out": recorded_hot == self.s7_hot_limit,
        }
        self.rows.append(
            Row(
                id="S7",
                scenario=f"S7 consume, {hot}/{self.args.connections} connections on one subject",
                unit="req/s",
                value=result["requests_per_second"] if ok else None,
                baseline="B-insert",
                target="≥ 0.5 × B-insert, zero overspend",
                target_ratio=0.5,
                verified=ok,
                problems=problems,
                details=result,
            )
        )

    # --- S5: CSV import and export --------------------------------------------------------

    def s5(self) -> None:
        commands = get_commands()
        if "import_users" not in commands or "export_users" not in commands:
            self.log("S5: the import_users/export_users commands are not in this tree: not available")
            for row_id, scenario in (("S5-import", "S5 CSV import"), ("S5-export", "S5 CSV export")):
                self.rows.append(
                    Row(
                        id=row_id,
                        scenario=scenario,
                        unit="rows/s",
                        verified=None,
                        problems=["not available: users/management/commands/import_users.py and export_users.py"],
                    )
                )
            return
        # What every command run pays before its first row: Python, Django and the app imports.
        self.command_startup = self.run_command(["export_users", "--help"])["seconds"]
        self.s5_import()
        self.s5_export()

    def run_command(self, argv: list[str], stdout_path: Path | None = None) -> dict:
        """Run ``manage.py`` in its own process; wall time and peak resident memory.

        Peak memory is the process's own high-water mark (VmHWM), read while it runs: the
        rusage of a child also counts the memory of the parent it was forked from.
        """
        out = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL
        peak_kib = 0
        with tempfile.TemporaryFile() as err:
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "manage.py", *argv], cwd=stack.ROOT, env=self.env, stdout=out, stderr=err
            )
            while process.poll() is None:
                peak_kib = max(peak_kib, stack.peak_rss_kib(process.pid))
                time.sleep(0.05)
            seconds = time.monotonic() - started
            err.seek(0)
            stderr = err.read().decode(errors="replace")[-2000:]
        if stdout_path:
            out.close()
        return {
            "exit_code": process.returncode,
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_kib / 1024, 1),
            "stderr_tail": stderr if process.returncode else "",
        }

    @staticmethod
    def command_argv(name: str, *, workspace_id: int, path: Path, role: str) -> tuple[list[str], bool]:
        """Arguments for the CSV commands, read from their own parsers: (argv, writes to stdout)."""
        parser = load_command_class("users", name).create_parser("manage.py", name)
        argv, path_given = [name], False
        for action in parser._actions:
            dest, options = action.dest, action.option_strings
            if "workspace" in dest:
                argv += [*options[:1], str(workspace_id)]
            elif not options and not path_given:
                argv.append(str(path))
                path_given = True
            elif options and dest in ("output", "out", "file", "path", "input", "csv") and not path_given:
                argv += [options[0], str(path)]
                path_given = True
            elif role == "import" and options and any(w in dest for w in ("apply", "commit", "no_dry_run")):
                argv.append(options[0])
        return argv, not path_given

    def s5_import(self) -> None:
        rows = self.sizes["import_rows"]
        tenant = self.tenant("s5 import")
        self.log(f"S5: CSV import of {rows:,} users")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "users.csv"
            with open(path, "w", newline="") as f:
                f.write("kana_id,user_id,name,email,billing_id,billing_provider,created_at,flags\n")
                for i in range(rows):
                    billing = f"cus_I{i:08d}" if i % 2 else ""
                    f.write(f",imp-{i},Imported {i},imp-{i}@example.com,{billing},,,\n")
            argv, _ = self.command_argv("import_users", workspace_id=tenant.pk, path=path, role="import")
            result = self.run_command(argv)
        stored = EndUser.objects.for_workspace(tenant.workspace).count()
        problems = []
        if result["exit_code"] != 0:
            problems.append(f"import_users exited {result['exit_code']}: {result['stderr_tail']}")
        if stored != rows:
            problems.append(f"{rows} rows imported, {stored} users stored")
        ok = not problems
        self.rows.append(
            Row(
                id="S5-import",
                scenario=f"S5 CSV import, {rows:,} users",
                unit="rows/s",
                value=rows / result["seconds"] if ok else None,
                target="≥ 25,000 rows/s",
                target_min=25_000,
                verified=ok,
                problems=problems,
                details={**result, "rows": rows, "startup_seconds": self.command_startup},
            )
        )
        self.rows.append(
            Row(
                id="S5-import-memory",
                scenario="S5 import peak memory",
                unit="MB",
                value=result["peak_rss_mb"] if ok else None,
                target="≤ 150 MB",
                target_max=150,
                verified=ok,
                details={"peak_rss_mb": result["peak_rss_mb"]},
            )
        )

    def s5_export(self) -> None:
        rows = self.sizes["export_rows"]
        tenant = self.tenant("s5 export")
        self.log(f"S5: loading {rows:,} users (COPY), then exporting them")
        bulk.load_users(
            self.bulk_conn,
            tenant.pk,
            (
                (tenant.pk, f"ex-{i}", f"Exported {i}", f"ex-{i}@example.com", f"cus_E{i:08d}" if i % 2 else "")
                for i in range(rows)
            ),
        )
        bulk.vacuum_analyze(self.bulk_conn, "users_enduser")
        bulk.vacuum_analyze(self.bulk_conn, "users_useridentity")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "export.csv"
            argv, to_stdout = self.command_argv("export_users", workspace_id=tenant.pk, path=path, role="export")
            result = self.run_command(argv, stdout_path=path if to_stdout else None)
            lines = 0
            if path.exists():
                with open(path, "rb") as f:
                    lines = sum(1 for _ in f)
        problems = []
        if result["exit_code"] != 0:
            problems.append(f"export_users exited {result['exit_code']}: {result['stderr_tail']}")
        if lines != rows + 1:
            problems.append(f"{rows} users, {lines} CSV lines (header included)")
        ok = not problems
        details = {**result, "rows": rows, "startup_seconds": self.command_startup}
        self.rows.append(
            Row(
                id="S5-export",
                scenario=f"S5 CSV export, {rows:,} users",
                unit="rows/s",
                value=rows / result["seconds"] if ok else None,
                target="≥ 200,000 rows/s",
                target_min=200_000,
                verified=ok,
                problems=problems,
                details=details,
            )
        )
        self.rows.append(
            Row(
                id="S5-export-memory",
                scenario="S5 export peak memory",
                unit="MB",
                value=result["peak_rss_mb"] if ok else None,
                target="≤ 150 MB",
                target_max=150,
                verified=ok,
                details=details,
            )
        )

    # --- The table ------------------------------------------------------------------------

    def link_baselines(self) -> None:
        """Each scenario's baseline figure; B-insert is the better of its two rounds."""
        inserts = [r.value for r in self.rows if r.id.startswith("B-insert#") and r.value]
        figures = {r.id: r.value for r in self.rows if r.value}
        if inserts:
            figures["B-insert"] = max(inserts)
        for row in self.rows:
            if row.baseline:
                row.baseline_value = figures.get(row.baseline)

    def report(self) -> dict:
        header = ("scenario", "figure", "baseline", "ratio", "target", "met")
        lines = []
        for row in self.rows:
            if row.not_run:
                met = "not run"
            elif row.verified is False and row.value is None:
                met = "NO RESULT"
            elif row.verified is None and row.value is None:
                met = "not available"
            else:
                met = {True: "yes", False: "NO", None: ""}[row.met]
            baseline = f"{row.baseline} {_fmt(row.baseline_value)}" if row.baseline else ""
            ratio = f"{row.ratio:.2f}" if row.ratio is not None else ""
            lines.append((row.scenario, _fmt(row.value, row.unit), baseline, ratio, row.target, met))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
        markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        markdown += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
        out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        out.append("-+-".join("-" * w for w in widths))
        out += [" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
        for row in self.rows:
            for problem in row.problems:
                out.append(f"  {row.id}: {problem}")
            if row.not_run:
                out.append(f"  {row.id}: not run: {row.not_run}")
        machine = {
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "postgresql": getattr(self, "server_version", None),
            # The machine is shared: its load average before and after the run says how much.
            "load_average_at_start": self.load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        }
        return {
            "table": "\n".join(out),
            "markdown": "\n".join(markdown) + "\n",
            "json": {
                "started_at": self.started_at,
                "mode": "quick" if self.args.quick else "full",
                "sizes": self.sizes,
                "workers": self.args.workers,
                "threads_per_worker": self.args.threads,
                "stored_events_per_workspace": self.args.stored,
                "connections": self.args.connections,
                "machine": machine,
                "scenarios": [row.as_scenario() for row in self.rows if row.target],
                "rows": [row.as_json() for row in self.rows],
            },
        }
