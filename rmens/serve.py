"""`rmens serve`: a saved ensemble's aggregated reward over HTTP, for RL engines that call a remote reward
model (OpenRLHF's `--remote_rm_url`, a verl reward function, anyone with an HTTP client).

    GET  /health       {"status": "ok", "k": 3, "rule": "lcb1"}
    POST /get_reward   OpenRLHF: {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [...]}
                       -> {"rewards": [...], "scores": [...], "extra_logs": {"reward_std": [...], "member_0": [...]}}
    POST /score        {"prompts": [...], "responses": [...]}
                       -> {"rewards": [...], "members": [[...] for each member], "std": [...]}

Each request is scored in batches of the reward's batch size, one request at a time (the model is one; a
request of 64 responses is one batched forward pass on a GPU). A bad request is a 4xx with one line naming
the field, and the server goes on; bound anywhere but the loopback interface it requires a bearer token.
Written on the standard library's HTTP server: the protocol is a few JSON fields, and no web framework is a
dependency of the library.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server refuses: its HTTP status and one line naming the field."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask: its body's bytes, and how many responses it scores."""

    max_bytes: int = 8 * 2**20
    max_batch: int = 256


# The most of a refused body read (and dropped) so that its client gets the answer; beyond it, a reset.
DRAIN_LIMIT = 64 * 2**20

# (prompts, responses) -> (rewards [n], members [k][n]): the library's EnsembleReward, or a stand-in in tests.
Scorer = Callable[[list[str], list[str]], tuple[list[float], list[list[float]]]]


def ensemble_scorer(reward) -> Scorer:
    """An rmens.reward.EnsembleReward as a Scorer: the rule's rewards and the standardised members."""

    def score(prompts: list[str], responses: list[str]) -> tuple[list[float], list[list[float]]]:
        result = reward(prompts, responses).check(len(prompts), "rmens serve")
        members = result.members if result.members is not None else result.scores[None]
        return result.scores.tolist(), members.tolist()

    return score


def _strings(body: dict, field: str, n: int | None = None) -> list[str]:
    value = body.get(field)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{field}: expected a list of strings")
    if n is not None and len(value) != n:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{field}: {len(value)} items, expected {n} (one per query)")
    return value


def split_queries(body: dict) -> tuple[list[str], list[str]]:
    """OpenRLHF sends each full text (prompt + response) as `query` and the prompts apart: the response is
    what follows its prompt."""
    queries = _strings(body, "query")
    prompts = _strings(body, "prompts", len(queries))
    responses = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        if not query.startswith(prompt):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"query[{i}]: does not start with prompts[{i}]")
        responses.append(query[len(prompt):])
    return prompts, responses


def _spread(members: list[list[float]]) -> list[float]:
    k = len(members)
    means = [sum(column) / k for column in zip(*members)]
    return [(sum((x - m) ** 2 for x in column) / k) ** 0.5 for column, m in zip(zip(*members), means)]


class RewardServer(ThreadingHTTPServer):
    """The HTTP server: `scorer` behind a lock, `token` required when set, `limits` on every request."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], scorer: Scorer, describe: dict[str, Any],
                 token: str | None = None, limits: Limits = Limits()):
        if token is None and not is_loopback(address[0]):
            raise ValueError(f"--host {address[0]} is reachable from other machines: serving there needs a bearer "
                             "token (--token-file)")
        super().__init__(address, _Handler)
        self.scorer, self.describe, self.token, self.limits = scorer, describe, token, limits
        self.lock = threading.Lock()

    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[list[float]]]:
        if len(prompts) > self.limits.max_batch:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(prompts)} responses in one request; at most {self.limits.max_batch}")
        with self.lock:
            return self.scorer(prompts, responses)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"  # keep-alive: an RL loop calls the server thousands of times
    timeout = 60  # seconds a connection may stall (idle keep-alive, a body shorter than announced)
    _body_read = False

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self._answer(lambda: self._health() if self.path == "/health" else self._not_found())

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/get_reward": self._get_reward, "/score": self._score}
        self._answer(lambda: routes.get(self.path, self._not_found)())

    def _health(self) -> dict:
        return {"status": "ok", **self.server.describe}

    def _not_found(self) -> dict:
        raise RequestError(HTTPStatus.NOT_FOUND, f"{self.path}: no such endpoint (GET /health, POST /get_reward, "
                                                 "POST /score)")

    def _get_reward(self) -> dict:
        prompts, responses = split_queries(self._body())
        rewards, members = self.server.score(prompts, responses)
        return {"rewards": rewards, "scores": rewards,
                "extra_logs": {"reward_std": _spread(members), **{f"member_{i}": m for i, m in enumerate(members)}}}

    def _score(self) -> dict:
        body = self._body()
        prompts = _strings(body, "prompts")
        rewards, members = self.server.score(prompts, _strings(body, "responses", len(prompts)))
        return {"rewards": rewards, "members": members, "std": _spread(members)}

    def _length(self) -> int | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _body(self) -> dict:
        length = self._length()
        if length is None or self.headers.get("Transfer-Encoding"):
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length: a length of 0 or more is required")
        if length > self.server.limits.max_bytes:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body: {length} bytes; at most {self.server.limits.max_bytes}")
        if self.headers.get_content_type() != "application/json":
            # A web page can POST text/plain to localhost without a preflight; a JSON body needs one.
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type: must be application/json")
        self._body_read = True
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body: not JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body: expected a JSON object")
        return body

    def _authorised(self) -> bool:
        if self.server.token is None:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def _answer(self, handle: Callable[[], dict]) -> None:
        self._body_read = False
        try:
            if self.headers.get("Origin"):  # browsers send it on cross-site requests; RL engines do not
                raise RequestError(HTTPStatus.FORBIDDEN, "Origin: requests from web pages are refused")
            if not self._authorised():
                raise RequestError(HTTPStatus.UNAUTHORIZED, "Authorization: a valid bearer token is required")
            status, payload = HTTPStatus.OK, handle()
        except RequestError as err:
            status, payload = err.status, {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - one bad request never stops the server
            log.exception("request to %s failed", self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"}
        data = json.dumps(payload).encode()
        if not self._body_read and (self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")):
            self._discard_body()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _discard_body(self) -> None:
        """A body the answer did not read: read it (up to a bound) so that the client gets the answer rather
        than a reset connection, and close the connection, or its bytes would be read as the next request."""
        self.close_connection = True
        length = self._length()
        if length is not None and not self.headers.get("Transfer-Encoding"):
            left = min(length, DRAIN_LIMIT)
            while left > 0:
                chunk = self.rfile.read(min(left, 2**16))
                if not chunk:
                    break
                left -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's signature
        log.debug("%s %s", self.address_string(), format % args)
