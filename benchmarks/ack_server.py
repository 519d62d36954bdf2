"""A stand-in for a tracking server that acknowledges every POST without storing anything.

``bench_mlflow.py --decompose`` points the logger's metric requests here to measure what the
client costs alone: the same JSON, the same HTTP round trips, none of a real server's CPU on
this machine. Run: ``python benchmarks/ack_server.py <port>``.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Acknowledge(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the MLflow client's session expects

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # one line per request would flood the benchmark's output
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Acknowledge).serve_forever()
