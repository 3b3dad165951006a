"""`rmens serve`: the ensemble's reward over HTTP, spoken as OpenRLHF's remote reward model client speaks it,
equal to the library's, and a server that refuses bad requests in one line and goes on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port

from rmens.models.config import AggregationConfig
from rmens.reward import EnsembleReward
from rmens.serve import Limits, RewardServer, ensemble_scorer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name a fruit.", "What colour is the sky?", "Name a fruit."]
RESPONSES = [" An apple.", " Blue, on a clear day.", " No."]


@pytest.fixture(scope="module")
def saved(standardised_ensemble):
    return standardised_ensemble


@pytest.fixture(scope="module")
def server(saved):
    reward = EnsembleReward.from_folder(saved, AggregationConfig.from_name("lcb1"), batch_size=2)
    served = RewardServer(("127.0.0.1", 0), ensemble_scorer(reward), {"k": 2, "rule": "lcb1"},
                          limits=Limits(max_bytes=20_000, max_batch=8))
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{served.server_port}", reward
    served.shutdown()
    served.server_close()


def _post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_openrlhf_requests_get_the_librarys_rewards_and_the_members_in_extra_logs(server):
    """The body OpenRLHF's remote reward client posts to --remote_rm_url: each full text as `query`, the
    prompts apart, and labels; the answer's `rewards` are what the library gives for the same pairs."""
    base, reward = server
    queries = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    status, answer = _post(f"{base}/get_reward", {"query": queries, "prompts": PROMPTS, "labels": ["", "", ""]})
    expected = reward(PROMPTS, RESPONSES)
    assert status == 200 and answer["scores"] == answer["rewards"]
    assert answer["rewards"] == pytest.approx(expected.scores.tolist(), abs=1e-5)
    members = torch.tensor([answer["extra_logs"]["member_0"], answer["extra_logs"]["member_1"]])
    assert torch.allclose(members, expected.members, atol=1e-5)
    assert answer["extra_logs"]["reward_std"] == pytest.approx(expected.members.std(dim=0, unbiased=False).tolist(),
                                                               abs=1e-5)


def test_the_plain_endpoint_and_health(server):
    base, reward = server
    status, answer = _post(f"{base}/score", {"prompts": PROMPTS, "responses": RESPONSES})
    assert status == 200 and answer["rewards"] == pytest.approx(reward(PROMPTS, RESPONSES).scores.tolist(), abs=1e-5)
    assert len(answer["members"]) == 2 and len(answer["std"]) == 3
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "k": 2, "rule": "lcb1"}


@pytest.mark.parametrize("path, body, status, message", [
    ("/get_reward", {"query": ["a"], "prompts": ["a", "b"]}, 400, "prompts: 2 items, expected 1"),
    ("/get_reward", {"query": ["Hello there"], "prompts": ["Bye"]}, 400, "query[0]: does not start with prompts[0]"),
    ("/score", {"prompts": ["p"], "responses": [3]}, 400, "responses: expected a list of strings"),
    ("/score", b"{not json", 400, "body: not JSON"),
    ("/score", {"prompts": ["p"] * 9, "responses": ["r"] * 9}, 413, "9 responses in one request; at most 8"),
    ("/score", {"prompts": ["p" * 4_000_000], "responses": ["r"]}, 413, "bytes; at most 20000"),
    ("/nowhere", {}, 404, "/nowhere: no such endpoint"),
], ids=["count", "prefix", "type", "json", "batch", "bytes", "path"])
def test_a_bad_request_is_one_line_naming_the_field_and_the_server_goes_on(server, path, body, status, message):
    base, _ = server
    code, answer = _post(f"{base}{path}", body)
    assert code == status and message in answer["error"] and "\n" not in answer["error"], answer
    assert _post(f"{base}/score", {"prompts": PROMPTS[:1], "responses": RESPONSES[:1]})[0] == 200


@pytest.mark.parametrize("headers, status, message", [
    ({"Content-Type": "text/plain"}, 415, "Content-Type: must be application/json"),
    ({"Origin": "http://evil.example"}, 403, "Origin: requests from web pages are refused"),
], ids=["text-plain", "origin"])
def test_what_a_web_page_could_send_is_refused(server, headers, status, message):
    """A page may POST text/plain to localhost without asking first, and its browser adds Origin."""
    base, _ = server
    code, answer = _post(f"{base}/score", {"prompts": ["p"], "responses": ["r"]}, headers)
    assert code == status and message in answer["error"]


def _raw(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_body_the_answer_did_not_read_is_never_read_as_a_next_request(server):
    base, _ = server
    smuggled = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    out = _raw(base, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    assert out.count(b"HTTP/1.1 ") == 1 and b" 200 " in out.split(b"\r\n")[0], out
    out = _raw(base, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: -1\r\n\r\n{}")
    assert out.count(b"HTTP/1.1 ") == 1 and b" 411 " in out.split(b"\r\n")[0], out


def test_beyond_the_loopback_a_token_is_required_and_checked(saved, tmp_path):
    with pytest.raises(ValueError, match="needs a bearer token"):
        RewardServer(("0.0.0.0", 0), lambda p, r: ([], []), {})
    served = RewardServer(("127.0.0.1", 0), lambda p, r: ([1.0] * len(p), [[1.0] * len(p)]), {}, token="s3cret")
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        base, body = f"http://127.0.0.1:{served.server_port}", {"prompts": ["p"], "responses": ["r"]}
        assert _post(f"{base}/score", body)[0] == 401
        assert _post(f"{base}/score", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(f"{base}/score", body, {"Authorization": "Bearer s3cret"}) == (
            200, {"rewards": [1.0], "members": [[1.0]], "std": [0.0]})
    finally:
        served.shutdown()
        served.server_close()


def test_the_command_serves_a_folder_and_refuses_a_wrong_rule_in_one_line(saved, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "rmens.cli", "serve", str(saved), "--rule", "lcb"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("rmens: error: 'lcb' names no rule"), bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rmens.cli", "serve", str(saved), "--rule", "min", "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(f"serving {saved} (k=2, rule min) on http://127.0.0.1:{port}")
        status, answer = _post(f"http://127.0.0.1:{port}/score", {"prompts": PROMPTS, "responses": RESPONSES})
        assert status == 200 and len(answer["rewards"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_verl_recipe_asks_the_server_and_gets_the_librarys_rewards(server, monkeypatch):
    """examples/verl_reward.py as verl's batch reward manager calls it (no verl needed)."""
    import importlib.util

    base, reward = server
    spec = importlib.util.spec_from_file_location("verl_reward", ROOT / "examples" / "verl_reward.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setenv("RMENS_REWARD_URL", base)
    monkeypatch.setenv("RMENS_REWARD_CHUNK", "2")  # 3 responses: two requests, one answer
    got = recipe.compute_score(data_sources=["x"] * 3, solution_strs=RESPONSES, ground_truths=[None] * 3,
                               extra_infos=[{"prompt": p} for p in PROMPTS])
    assert got == pytest.approx(reward(PROMPTS, RESPONSES).scores.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match=r"extra_infos\[0\]: needs the response's prompt"):
        recipe.compute_score(data_sources=["x"], solution_strs=["r"], ground_truths=[None], extra_infos=[{}])
