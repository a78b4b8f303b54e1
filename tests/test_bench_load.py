"""The benchmark's load client builds valid, distinct Segment messages (no server needed)."""

import json

from django.utils import timezone

from bench.load import BatchFactory, ConsumeFactory, EntitlementCheckFactory, IdentifyMixFactory, TrackFactory
from segment_ingest.messages import parse_message


def test_track_messages_are_valid_and_each_has_its_own_message_id():
    factory = TrackFactory("s1", {"users": 10})
    bodies = [json.loads(factory(n)[0]) for n in range(50)]
    assert len({b["messageId"] for b in bodies}) == 50
    assert {b["userId"] for b in bodies} == {f"u{i}" for i in range(10)}
    for body in bodies:
        assert parse_message(body, received_at=timezone.now()).properties["featureId"] == "reports"


def test_a_batch_holds_distinct_messages_half_of_them_shaped_for_the_rules():
    factory = BatchFactory("s3", {"size": 100, "users": 1000})
    first, second = (json.loads(factory(n)[0])["batch"] for n in (0, 1))
    ids = {m["messageId"] for m in first + second}
    assert len(ids) == 200
    mapped = [
        m
        for m in first
        if m["event"] == "Report Exported" or m["properties"].get("plan", {}).get("tier") == "enterprise"
    ]
    assert len(mapped) == 50


def test_the_identify_mix_cycles_through_its_four_kinds_and_stops_when_a_pool_is_used_up():
    factory = IdentifyMixFactory("s2", {"update_pool": 5, "claim_pool": 2, "merge_pool": 2})
    made = [factory(n) for n in range(12)]
    kinds = [m[1] for m in made if m is not None]
    assert kinds == ["create", "update", "claim", "merge"] * 2 + ["create", "update"]
    assert made[10] is None


def test_consumes_put_the_first_connections_on_the_hot_subject_each_with_its_own_key():
    factory = ConsumeFactory("s7", {"users": 3, "hot_user": "hot", "hot_connections": 2})
    made = [(factory(n, connection=n % 4), n % 4) for n in range(40)]
    bodies = [(json.loads(body), kind, connection) for (body, kind), connection in made]
    assert len({b["idempotency_key"] for b, _, _ in bodies}) == 40
    assert {(b["user_id"] == "hot", kind) for b, kind, connection in bodies if connection < 2} == {(True, "hot")}
    assert {b["user_id"] for b, kind, connection in bodies if connection >= 2} == {"u0", "u1", "u2"}
    assert EntitlementCheckFactory("s6", {"users": 2})(3) == (b"?user_id=u1&feature=messages&delta=1", "check")


def _serial_server(service_seconds: float):
    """A local HTTP server answering one request at a time, each after ``service_seconds``."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1]
                )
                while len(body) < length:
                    body += conn.recv(65536)
                time.sleep(service_seconds)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _open_loop(port: int, rate: float, duration: float) -> dict:
    """The load client as the harness runs it: its own process, the spec on stdin."""
    import subprocess
    import sys
    from pathlib import Path

    spec = {"host": "127.0.0.1", "port": port, "path": "/x", "connections": 1, "warmup": 0, "duration": duration}
    spec.update(kind="track", prefix="ol", rate=rate)
    load = Path(__file__).resolve().parent.parent / "bench" / "load.py"
    done = subprocess.run(
        [sys.executable, str(load)], input=json.dumps(spec), capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(done.stdout)


def test_the_open_loop_sends_at_the_offered_rate_whatever_the_server_does():
    listener = _serial_server(0.001)
    try:
        result = _open_loop(listener.getsockname()[1], rate=100, duration=1.0)
    finally:
        listener.close()
    assert 95 <= result["issued"] <= 101
    assert result["status_counts"] == {"200": result["issued"]}
    assert result["p99_ms"] < 200


def test_open_loop_latency_counts_from_the_scheduled_time_so_a_slow_server_is_charged_for_the_queue():
    # The server handles 20 requests/s, 40 are offered: requests queue up, and the last ones
    # wait about half the window. Measured from the send time of a closed loop, each would
    # look like 50 ms.
    listener = _serial_server(0.05)
    try:
        result = _open_loop(listener.getsockname()[1], rate=40, duration=1.0)
    finally:
        listener.close()
    assert result["issued"] == 40
    assert result["p99_ms"] > 500


def test_the_s7_check_refuses_a_run_whose_hot_subject_overspent_or_whose_answers_miscount(db):
    """The check reads what the ledger stored: usage past the hot subject's limit (recorded
    here through ``usage/records``, which does not refuse) and answers that do not match the
    usage rows are both reported; an honest run is not."""
    from decimal import Decimal

    from bench.scenarios import consume_problems
    from entitlements.access import record_usage
    from features.services import feature_create
    from kana.services import workspace_create_with_key
    from users.models import EndUser

    workspace = workspace_create_with_key(name="bench s7 check").api_key.workspace
    feature = feature_create(workspace=workspace, key="messages")
    for n, user_id in enumerate(["hot", "hot", "u0"]):
        record_usage(
            workspace,
            user_id=user_id,
            feature_key="messages",
            delta=Decimal(1),
            action="add",
            idempotency_key=f"s7-{n}",
        )
    hot = EndUser.objects.for_workspace(workspace).get(user_id="hot")

    def problems(limit, recorded):
        return consume_problems(
            workspace, prefix="s7", feature=feature, hot_user_pk=hot.pk, hot_limit=limit, recorded_by_kind=recorded
        )

    assert problems(2, {"hot": 2, "spread": 1}) == []
    assert problems(1, {"hot": 2, "spread": 1}) == ["overspend: the hot subject used 2 of a limit of 1"]
    assert problems(2, {"hot": 1, "spread": 1}) == ["hot: 1 consumes answered recorded, 2 usage rows stored"]


def test_the_open_loop_says_where_its_slowest_requests_spent_their_time():
    # A server slower than the offered rate: the late requests waited for the server (their
    # answer), not for the client (its send lag), and the report says when each was due.
    import re

    listener = _serial_server(0.05)
    try:
        result = _open_loop(listener.getsockname()[1], rate=40, duration=1.0)
    finally:
        listener.close()
    slowest = result["slowest"]
    assert len(slowest) == 10
    assert [s["latency_ms"] for s in slowest] == sorted((s["latency_ms"] for s in slowest), reverse=True)
    assert slowest[0]["latency_ms"] > 500
    for s in slowest:
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", s["due"])
        parts = s["send_lag_ms"] + s["connect_ms"] + s["answer_ms"]
        assert abs(parts - s["latency_ms"]) < 1
        assert s["answer_ms"] > s["send_lag_ms"]
    assert result["send_lag_p99_ms"] < result["answer_p99_ms"]


def test_the_open_loop_writes_every_request_of_its_window_when_asked(tmp_path, monkeypatch):
    # With $KANA_BENCH_TIMINGS, each request's due time (wall clock) and latency, to set the
    # slow ones beside a sampler's counters; the report counts those over 10 ms.
    import time

    path = tmp_path / "timings.json"
    monkeypatch.setenv("KANA_BENCH_TIMINGS", str(path))
    listener = _serial_server(0.05)  # 20 requests/s served, 40 offered: most wait
    started = time.time()
    try:
        result = _open_loop(listener.getsockname()[1], rate=40, duration=1.0)
    finally:
        listener.close()
    timings = json.loads(path.read_text())
    assert timings["fields"] == ["due", "latency", "send_lag", "connect", "answer"]
    rows = sorted(timings["rows"])
    assert len(rows) == result["completed_in_window"] == 40
    dues = [row[0] for row in rows]  # on the schedule (every 25 ms), however late the answers
    assert started <= dues[0] and dues[-1] <= time.time()
    assert all(abs((b - a) - 0.025) < 0.002 for a, b in zip(dues, dues[1:], strict=False))
    assert all(row[1] >= 0.05 for row in rows)  # each answer alone takes 50 ms
    assert result["over_10ms"] == 40
    assert abs(max(row[1] for row in rows) * 1000 - result["slowest"][0]["latency_ms"]) < 0.1


def test_the_open_loop_counts_only_the_requests_over_10_ms_and_writes_no_file_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("KANA_BENCH_TIMINGS", raising=False)
    monkeypatch.chdir(tmp_path)
    listener = _serial_server(0.001)  # far faster than offered: hardly any request waits
    try:
        result = _open_loop(listener.getsockname()[1], rate=100, duration=1.0)
    finally:
        listener.close()
    assert result["over_10ms"] < result["completed_in_window"] / 10
    assert list(tmp_path.iterdir()) == []
