"""The front door (deployments/front.py) with a real HAProxy in front of two small HTTP servers
that stand where Serve's proxy and its fallback proxy stand: which one gets the requests, what
a restarting proxy without routes does to clients (nothing), and the front door's own restarts.
Behind a real Serve: test_service.py."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from deployments.front import FALLBACK_PORT_ENV, FrontDoor, free_port, front_config, haproxy_binary
from transferdesk.errors import TransferDeskError


class QuietServer(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 resets connections under HAProxy's checks and load

    def handle_error(self, *args: object) -> None:
        pass  # HAProxy's health checks hang up without reading the answer


class Proxy:
    """An HTTP server that answers every path with its name, and /-/healthz with 200 while it
    has routes; without them it answers as a restarted Serve proxy does: 503 there, 404 else."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name, self.has_routes, self.dies_during_slow_requests = name, True, False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/slow" and proxy.dies_during_slow_requests:
                    time.sleep(0.3)  # the process is killed meanwhile: no answer, no new connection
                    proxy.stop_listening()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.path == "/-/healthz":
                    status = 200 if proxy.has_routes else 503
                else:
                    status = 200 if proxy.has_routes else 404
                body = proxy.name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = QuietServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def stop_listening(self) -> None:
        self.server.socket.close()


@pytest.fixture
def proxies() -> Iterator[tuple[Proxy, Proxy]]:
    primary, fallback = Proxy("serve"), Proxy("fallback")
    yield primary, fallback
    for proxy in (primary, fallback):
        proxy.stop()


@pytest.fixture
def front(proxies: tuple[Proxy, Proxy]) -> Iterator[FrontDoor]:
    with FrontDoor("127.0.0.1", free_port(), proxies[0].port, proxies[1].port) as door:
        _until(lambda: _answer(door) == "serve")
        yield door


def _answer(front: FrontDoor) -> str | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{front.port}/v1/model", timeout=5)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else str(response.status_code)


def _until(check: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_configuration_is_one_haproxy_accepts(tmp_path: Path) -> None:
    path = tmp_path / "front.cfg"
    path.write_text(front_config("127.0.0.1", 8000, 8001, 8002))
    checked = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_claim_takes_the_public_address_and_gives_serve_loopback_ports() -> None:
    config = {"http_options": {"host": "0.0.0.0", "port": 9000, "request_timeout_s": 30}}
    env: dict[str, str] = {}
    front = FrontDoor.claim(config, env)
    assert (front.host, front.port) == ("0.0.0.0", 9000)
    assert config["http_options"] == {"host": "127.0.0.1", "port": front.serve_port, "request_timeout_s": 30}
    assert env[FALLBACK_PORT_ENV] == str(front.fallback_port) and front.serve_port != front.fallback_port


def test_requests_go_to_the_fallback_while_the_proxy_is_gone_or_has_no_routes(
    front: FrontDoor, proxies: tuple[Proxy, Proxy]
) -> None:
    primary = proxies[0]
    answers = [_answer(front) for _ in range(20)]
    assert set(answers) == {"serve"}  # the fallback is a backup: idle while Serve's proxy answers
    port = primary.port
    primary.stop()  # Serve's proxy dies
    answers = [_answer(front) for _ in range(50)]
    assert set(answers) == {"fallback"}, answers  # not one failed request: retried on the fallback
    restarted = Proxy("serve", port)  # started again by Serve, without its routes yet
    restarted.has_routes = False
    try:
        answers = [_answer(front) for _ in range(40)]
        assert set(answers) == {"fallback"}, answers  # never its 404s
        restarted.has_routes = True
        _until(lambda: _answer(front) == "serve")
    finally:
        restarted.stop()


def test_a_post_in_flight_in_a_proxy_that_dies_is_a_json_502(
    front: FrontDoor, proxies: tuple[Proxy, Proxy]
) -> None:
    proxies[0].dies_during_slow_requests = True
    # The body's end comes after its start has gone on to the proxy, as an upload's does: HAProxy
    # never holds this POST whole, so it cannot send it again. (A small body sent with its
    # headers may be held whole, and then sent to the fallback like a GET.)
    body = json.dumps({"text": "where is my parcel"}).encode()

    def late() -> Iterator[bytes]:
        yield body[:5]
        time.sleep(0.3)
        yield body[5:]

    def post() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        try:
            conn.request("POST", "/slow", body=late(), headers={"Content-Length": str(len(body))})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    for _ in range(5):
        status, answer = post()
        if answer != b"fallback":
            break
        # It never reached Serve's proxy: a health check answered late on a busy machine and
        # marked it down for a moment. Once it is back, try again.
        _until(lambda: _answer(front) == "serve")
    assert status == 502 and json.loads(answer)["error"]["code"] == "proxy_lost"
    assert _answer(front) == "fallback"  # the next one goes on


def test_a_get_whose_proxy_dies_under_it_is_answered_by_the_fallback(
    front: FrontDoor, proxies: tuple[Proxy, Proxy]
) -> None:
    """HAProxy holds a GET whole and sends it again; a POST whose body it streamed is lost with
    the proxy (the Serve test counts those)."""
    proxies[0].dies_during_slow_requests = True
    response = httpx.get(f"http://127.0.0.1:{front.port}/slow", timeout=10)
    assert (response.status_code, response.text) == (200, "fallback")


def test_no_proxy_answering_is_a_503_with_retry_after(front: FrontDoor, proxies: tuple[Proxy, Proxy]) -> None:
    for proxy in proxies:
        proxy.has_routes = False
    _until(lambda: _answer(front) == "503")
    response = httpx.get(f"http://127.0.0.1:{front.port}/v1/route")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "unavailable"


def test_a_killed_front_door_is_started_again_at_once(front: FrontDoor) -> None:
    before = front.pid
    assert before is not None
    os.kill(before, signal.SIGKILL)
    _until(lambda: front.pid != before and _answer(front) == "serve", timeout_s=5)
    assert front.restarts == 1


def test_a_front_door_that_cannot_start_says_why() -> None:
    taken = Proxy("taken")  # holds the port the front door is asked to listen on
    try:
        door = FrontDoor("127.0.0.1", taken.port, free_port(), free_port())
        with pytest.raises(TransferDeskError, match="exited at once"), door:
            pass
    finally:
        taken.stop()
