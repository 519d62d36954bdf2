"""A real HTTP webhook receiver on 127.0.0.1 for notifier tests (and the watchdog benchmark).

It records every POST (arrival time, headers, JSON body, the status it answered, the client's
address: one per connection) and answers
from a script: ``Receiver(answers=[(429, {"Retry-After": "1"}), 200])`` answers 429 once, then
200; ``hang=True`` accepts requests and never answers them (until ``close``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self, answers: list[Any] | None = None, hang: bool = False):
        self.answers = list(answers or [])
        self.hang = hang
        self.requests: list[dict[str, Any]] = []
        self._released = threading.Event()
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer = receiver.answers.pop(0) if receiver.answers else 200
                status, headers = (answer, {}) if isinstance(answer, int) else answer
                with receiver._arrived:
                    receiver.requests.append(
                        {
                            "time": time.time(),
                            "path": self.path,
                            "status": status,
                            "headers": dict(self.headers),
                            "json": json.loads(body),
                            "peer": self.client_address,
                        }
                    )
                    receiver._arrived.notify_all()
                if receiver.hang:
                    receiver._released.wait(60)
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/secret-token"

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` requests arrived (``False`` on timeout)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def bodies(self, status: int | None = 200) -> list[Any]:
        return [r["json"] for r in self.requests if status is None or r["status"] == status]

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
