"""JSON over HTTP to a server (vLLM's OpenAI-compatible one), with retries: the one transport of the served teacher and
the vLLM rollouts. Only the standard library talks HTTP."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any


class JsonServerClient:
    """A client of the server at ``url`` (with or without the ``/v1`` suffix, e.g. ``http://127.0.0.1:8000/v1``).

    Each request waits ``timeout`` seconds; connection errors, timeouts and 5xx answers are retried ``retries``
    times, after ``backoff``, 2 x ``backoff``, ... seconds. Other 4xx answers are not retried: the error carries the
    server's message. Errors are ``error`` (a subclass sets it) and name the ``server_name`` and its URL.
    """

    server_name = "server"  # for messages: "The teacher server at http://..."
    error: type[Exception] = RuntimeError

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float):
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"timeout must be > 0, retries and backoff >= 0; got {timeout}, {retries}, {backoff}.")
        self.url = url.rstrip("/")
        self.root = self.url.removesuffix("/v1")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.bytes_received = 0  # response bodies, for measuring the traffic

    def request(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        """GET (no payload) or POST JSON to ``root + path``; the decoded JSON answer (None for an empty body)."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.root + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as error:
                detail = error.read()[:1000].decode(errors="replace")
                if error.code < 500:
                    refused = f"The {self.server_name} at {self.url} refused {path} (HTTP {error.code}): {detail}"
                    raise self.error(refused) from None
                last = f"HTTP {error.code}: {detail}"
                continue
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
                last = f"{type(error).__name__}: {error}"
                continue
            self.bytes_received += len(body)
            try:
                return json.loads(body) if body else None
            except ValueError:
                raise self.error(
                    f"The {self.server_name} at {self.url} answered {path} with {len(body)} bytes that are not JSON: "
                    f"{body[:200]!r}"
                ) from None
        raise self.error(
            f"The {self.server_name} at {self.url} did not answer {path} after {self.retries + 1} attempts (last: "
            f"{last}). Is it running? Restart it and resume from the last checkpoint."
        )
