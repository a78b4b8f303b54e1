"""A real HTTP receiver for webhook tests, and the signature check a customer would write.

The receiver is ``http.server`` in a thread on 127.0.0.1: it answers from a script (500 then
200, a redirect, a slow answer) and keeps every request it got. The signature is checked
with the README's own snippet (run from README.md as written), never with Kana's signing
code: a wrong signature, or a README that drifted, fails the tests.
"""

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .api_support import ApiClient

ROOT = Path(__file__).resolve().parent.parent


def _readme_verifier():
    section = (ROOT / "README.md").read_text().split("\n## Webhooks\n", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    return namespace["verify_kana_signature"]


verify_signature = _readme_verifier()


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: str = "ok"
    delay: float = 0.0
    headers: dict = field(default_factory=dict)


class Receiver:
    """Answers each POST with the next scripted reply (the last one repeats)."""

    def __init__(self, *replies: Reply):
        self.replies = list(replies) or [Reply()]
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                    reply = receiver.replies[min(len(receiver.requests), len(receiver.replies)) - 1]
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body.encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up (a timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def create_endpoint(api: ApiClient, url: str, events=None, **fields) -> dict:
    """POST /api/v1/webhooks; the answer, secret included."""
    body = {"url": url, "events": events or ["usage.limit_reached", "user.merged"], **fields}
    response = api.post("webhooks", body)
    assert response.status_code == 201, response.content
    return response.json()
