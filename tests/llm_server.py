"""A loopback OpenAI-compatible HTTP server with scripted replies (stdlib only; real HTTP, no mocks).

Usage::

    with ScriptedLLMServer(models=["test-model"]) as srv:
        srv.push(Reply.json({...}), Reply.text("Sure: ```json {...} ```"), Reply.error(500), Reply.sleep(3, "{}"))
        cfg = LLMConfig(base_url=srv.base_url, model="test-model")
        ...
        srv.requests      # every request received: method, path, headers, body (parsed JSON)

Endpoints: ``POST /v1/chat/completions`` (pops the next scripted reply; an empty queue answers 500
"script exhausted") and ``GET /v1/models``. With ``reject_response_format=True`` any chat request
carrying ``response_format`` is answered with HTTP 400 without consuming the queue.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Reply", "RecordedRequest", "ScriptedLLMServer"]


@dataclass
class Reply:
    """One scripted answer."""

    content: str | None = None  # assistant message content (200)
    status: int = 200
    error_message: str = ""
    delay: float = 0.0  # seconds to wait before answering

    @classmethod
    def text(cls, content: str) -> "Reply":
        return cls(content=content)

    @classmethod
    def json(cls, obj: Any) -> "Reply":
        return cls(content=json.dumps(obj))

    @classmethod
    def error(cls, status: int = 500, message: str = "internal server error") -> "Reply":
        return cls(status=status, error_message=message)

    @classmethod
    def sleep(cls, seconds: float, content: str = "{}") -> "Reply":
        return cls(content=content, delay=seconds)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: Any = None
    received_at: float = field(default_factory=time.time)


class ScriptedLLMServer:
    def __init__(self, models: list[str] | None = None, reject_response_format: bool = False,
                 models_route: bool = True):
        self.models = list(models or ["test-model"])
        self.models_route = models_route  # False: GET /v1/models answers 404 (some servers lack it)
        self.reject_response_format = reject_response_format
        self.queue: deque[Reply] = deque()
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "ScriptedLLMServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                return

            def _record(self) -> RecordedRequest:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                rec = RecordedRequest(self.command, self.path, {k: v for k, v in self.headers.items()}, raw, body)
                with server._lock:
                    server.requests.append(rec)
                return rec

            def _send(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # noqa: N802
                self._record()
                if server.models_route and self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self):  # noqa: N802
                rec = self._record()
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                body = rec.body if isinstance(rec.body, dict) else {}
                if server.reject_response_format and "response_format" in body:
                    self._send(400, {"error": {"message": "response_format is not supported by this server",
                                               "type": "invalid_request_error", "param": "response_format"}})
                    return
                with server._lock:
                    reply = server.queue.popleft() if server.queue else Reply.error(500, "script exhausted")
                if reply.delay:
                    server._stop.wait(reply.delay)
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": reply.error_message, "type": "server_error"}})
                    return
                self._send(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "test-model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ScriptedLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- script / inspection ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self.queue.extend(replies)

    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]
