"""Slow or lying clients against the production set-up: nginx (deploy/nginx.conf) in front
of gunicorn's sync workers (issue 15: a client whose Content-Length exceeds its body held a
worker for 30 s, then 500; a handful of them blocked every worker).

Real processes on loopback: gunicorn with two sync workers on the test database, and nginx
with the project's own configuration, its ports swapped for free loopback ones.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from features.models import Event

from .conftest import ROOT, database_url_for_subprocess, requires_postgres

pytestmark = [
    requires_postgres,
    pytest.mark.postgres,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx-light)"),
]

SLOW_CLIENTS = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.fixture
def kana_behind_nginx(transactional_db, tmp_path):
    """gunicorn (2 sync workers) behind nginx configured by deploy/nginx.conf; yields nginx's port."""
    gunicorn_port, nginx_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocess(),
        "DB_CONN_MAX_AGE": "0",
        "KANA_DEBUG": "0",
        "SECRET_KEY": "slow-clients-test-only",
        "ALLOWED_HOSTS": "*",
    }
    env.pop("REDIS_URL", None)  # no task is sent here: tasks run in-process
    gunicorn = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "kana.wsgi",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{gunicorn_port}",
            "--timeout",
            "30",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "gunicorn.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    config = (
        config.replace("listen 80;", f"listen 127.0.0.1:{nginx_port};")
        .replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{gunicorn_port};")
        .replace("pid /run/nginx-kana.pid;", f"pid {tmp_path}/nginx.pid;")
        .replace("worker_processes auto;", "worker_processes 1;")
        .replace(
            "access_log off;",
            f"log_format status '$status $request_uri';\n    access_log {tmp_path}/access.log status;",
        )
    )
    assert f"listen 127.0.0.1:{nginx_port};" in config and f"server 127.0.0.1:{gunicorn_port};" in config
    temp_paths = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = config.replace("http {\n", "http {\n" + temp_paths, 1)
    (tmp_path / "nginx.conf").write_text(f"error_log {tmp_path}/nginx-error.log;\n" + config)
    nginx = subprocess.Popen(
        [
            "nginx",
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "nginx-error.log"),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-g",
            "daemon off;",
        ],
        stdout=open(tmp_path / "nginx.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_port(gunicorn_port, gunicorn)
        _wait_for_port(nginx_port, nginx)
        yield nginx_port, tmp_path / "access.log"
    finally:
        _stop(nginx)
        _stop(gunicorn)


def _auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def _track(port: int, key: str, message_id: str) -> tuple[int, float]:
    body = json.dumps({"userId": "u-1", "event": "Sent", "messageId": message_id}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/track",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": _auth(key)},
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, time.monotonic() - started


def _slow_client(port: int, key: str) -> socket.socket:
    """Declares a 1,000-byte body, sends 10 bytes of it, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(
        (
            "POST /v1/track HTTP/1.1\r\nHost: kana\r\nContent-Type: application/json\r\n"
            f"Authorization: {_auth(key)}\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        + b'{"userId":'
    )
    return sock


def test_slow_clients_neither_hold_the_workers_nor_get_a_5xx(kana_behind_nginx, tenant):
    port, access_log = kana_behind_nginx
    assert _track(port, tenant.key, "warm-up")[0] == 200

    slow = [_slow_client(port, tenant.key) for _ in range(SLOW_CLIENTS)]
    started = time.monotonic()
    try:
        # Ten times the two workers' worth of stalled bodies, and normal traffic goes on.
        answers = [_track(port, tenant.key, f"normal-{n}") for n in range(10)]
        assert [status for status, _ in answers] == [200] * 10
        assert max(seconds for _, seconds in answers) < 2, answers

        # Each stalled body is cut off within nginx's client_body_timeout (5 s): nginx logs a
        # 408 and closes the connection (it sends no answer to a client that stopped sending).
        replies = []
        for sock in slow:
            try:
                replies.append(sock.recv(200))
            except TimeoutError:
                replies.append(b"")
        waited = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
    assert replies == [b""] * SLOW_CLIENTS  # closed: never a 5xx
    assert waited < 12
    statuses = [line.split()[0] for line in access_log.read_text().splitlines()]
    assert statuses.count("408") == SLOW_CLIENTS and statuses.count("200") == 11, statuses
    assert Event.objects.filter(message_id__startswith="normal-").count() == 10
    assert Event.objects.count() == 11  # the slow clients stored nothing


def test_the_production_config_states_the_body_timeout_and_buffering():
    config = (Path(ROOT) / "deploy" / "nginx.conf").read_text()
    assert "client_body_timeout 5s;" in config and "proxy_request_buffering on;" in config
