"""A small local HTTP server speaking the OpenAI chat-completions API, for tests.

``POST /v1/chat/completions`` answers with a valid chat-completion body whose message content
is JSON obeying the schema requested in ``response_format`` (``json_schema``). The answer is
derived deterministically from the last user message: the words (4+ letters) of its numbered
lines (``1. ...``, the comments), or of the whole message when it has none. For a schema with
``semantic`` and ``attribute`` arrays, words in :data:`ATTRIBUTE_WORDS` go to ``attribute``
and the rest to ``semantic``; any other array-of-strings property gets all the words.

Usage::

    with ChatServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        assert server.requests == 1

``mode`` (settable at any time) makes it misbehave: ``"garbage"`` (content is not JSON),
``"bad_schema"`` (JSON that breaks the schema), ``"http_500"`` (a server error). ``fail_after=n``
answers the first ``n`` requests normally and the rest in ``mode`` ``"garbage"``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ATTRIBUTE_WORDS = frozenset(
    """blurry bokeh bright colour color composition contrast crisp dark exposure focus grainy
    lighting moody noisy overexposed saturated sharp soft tilted underexposed vivid""".split()
)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_WORD = re.compile(r"[a-z]{4,}")


def answer_for(body: dict[str, Any]) -> dict[str, list[str]]:
    """The deterministic structured answer for a chat-completions request body."""
    text = ""
    for message in body.get("messages", []):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            text = str(content)
    items = [m.group(1) for line in text.splitlines() if (m := _NUMBERED.match(line))]
    words = sorted(set(_WORD.findall(" ".join(items or [text]).lower())))
    schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema", {})
    props = schema.get("properties", {}) or {"semantic": {}, "attribute": {}}
    if {"semantic", "attribute"} <= set(props):
        answer = {
            "semantic": [w for w in words if w not in ATTRIBUTE_WORDS],
            "attribute": [w for w in words if w in ATTRIBUTE_WORDS],
        }
        return {key: answer.get(key, []) for key in props}
    return {key: list(words) for key in props}


class ChatServer:
    """A threaded chat-completions server on 127.0.0.1 (free port); a context manager."""

    def __init__(self, mode: str = "ok", fail_after: int | None = None) -> None:
        self.mode = mode
        self.fail_after = fail_after
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str] = []  # the Authorization header of each request
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """The value for ``openai.OpenAI(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ChatServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="chat-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _respond(self, body: dict[str, Any]) -> tuple[int, bytes]:
        """Status and JSON body for one request (counts it)."""
        with self._lock:
            self.requests += 1
            self.bodies.append(body)
            number = self.requests
            mode = self.mode
            if self.fail_after is not None and number > self.fail_after:
                mode = "garbage"
        if mode == "http_500":
            error = {"error": {"message": "test server error", "type": "server_error"}}
            return 500, json.dumps(error).encode()
        if mode == "garbage":
            content = "this is {not json"
        elif mode == "bad_schema":
            content = json.dumps({"semantic": "cat", "colours": []})
        else:
            content = json.dumps(answer_for(body))
        completion = {
            "id": f"chatcmpl-test-{number}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "test-model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return 200, json.dumps(completion).encode()


def _handler_for(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            with server._lock:
                server.authorizations.append(self.headers.get("Authorization", ""))
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, b'{"error": {"message": "not found", "type": "invalid_request_error"}}')
                return
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send(400, b'{"error": {"message": "bad JSON", "type": "invalid_request_error"}}')
                return
            self._send(*server._respond(body))

        def _send(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler
