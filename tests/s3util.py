"""A real S3 endpoint on 127.0.0.1 for the storage tests: moto's server, with a small WSGI middleware
in front of its app that counts requests and injects faults.

Faults apply to object requests (GETs unless ``Faults.methods`` says otherwise) whose key matches
``Faults.match``, one per request, in the order of ``Faults.plan``:

* ``slowdown`` -- 503 SlowDown (S3's throttling answer), no body;
* ``truncate`` -- the full Content-Length, half the body, then the connection closes (FIN);
* ``stall``    -- half the body, then nothing for ``stall_s`` seconds (longer than the reader's read
  timeout), then the connection closes;
* ``hang``     -- the headers, then no byte of the body for ``stall_s`` seconds, then the connection closes;
* ``reset``    -- the connection is reset (RST) before any response;
* ``outage``   -- the server stops (its port refuses connections) for ``outage_s`` seconds and
  restarts on the same port; this GET's connection is reset.
* ``""``       -- no fault for this GET.

Once ``plan`` is empty, ``after`` (default ``""``) applies to every further matching GET: e.g.
``"slowdown"`` makes a store that never recovers. Every stall is bounded, and ``close()`` ends them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
"""Environment for boto3 against moto (which accepts any keys); no instance-metadata lookups."""

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')


class Faults:
    """WSGI middleware: counts requests per (method, key), remembers each object GET's headers, injects faults."""

    def __init__(self, server: FaultyS3):
        self.server = server
        self.app = None  # moto's app, set by the server
        self.lock = threading.Lock()
        self.plan: list[str] = []
        self.after = ""
        self.match = re.compile(r"\.tar$")
        self.methods = ("GET",)  # requests that faults apply to
        self.stall_s, self.outage_s = 3.0, 2.0
        self.requests: Counter = Counter()  # (method, key) -> count; key "" for bucket-level requests
        self.log: list[tuple[str, str]] = []  # (method, key) of every request, in arrival order
        self.gets: list[dict] = []  # every object GET: key, Range, If-Match, fault, time
        self.injected: list[tuple[float, str, str]] = []  # (time, fault, key)
        self.released = threading.Event()

    def reset(self, plan=(), after: str = "", match: str = r"\.tar$", methods=("GET",)) -> None:
        with self.lock:
            self.plan, self.after, self.match, self.methods = list(plan), after, re.compile(match), tuple(methods)
            self.requests.clear()
            self.log.clear()
            self.gets.clear()
            self.injected.clear()

    def count(self, method: str, suffix: str = "") -> int:
        """Requests of ``method`` on keys ending with ``suffix`` ('' = all, bucket-level included)."""
        with self.lock:
            return sum(n for (m, k), n in self.requests.items() if m == method and k.endswith(suffix))

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        parts = path.lstrip("/").split("/", 1)
        key = parts[1] if len(parts) > 1 else ""
        fault = ""
        with self.lock:
            self.requests[(method, key)] += 1
            self.log.append((method, key))
            if method in self.methods and key and self.match.search(key):
                fault = self.plan.pop(0) if self.plan else self.after
            if method == "GET" and key:
                self.gets.append({"key": key, "range": environ.get("HTTP_RANGE"),
                                  "if_match": environ.get("HTTP_IF_MATCH"), "fault": fault, "t": time.monotonic()})
                if fault:
                    self.injected.append((time.monotonic(), fault, key))
        sock = environ.get("werkzeug.socket")
        if fault == "slowdown":
            start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                             ("Content-Length", str(len(SLOWDOWN)))])
            return [SLOWDOWN]
        if fault in ("reset", "outage"):
            if fault == "outage":
                threading.Thread(target=self.server.outage, args=(self.outage_s,), daemon=True).start()
            _reset(sock)
            return []
        status, headers, body = _call(self.app, environ)
        if fault not in ("truncate", "stall", "hang"):
            start_response(status, headers)
            return [body]
        start_response(status, headers)  # moto's own Content-Length: the whole body is promised

        def half_then_close():
            yield body[:len(body) // 2] if fault != "hang" else b""
            if fault in ("stall", "hang"):
                self.released.wait(self.stall_s)
            _close(sock)

        return half_then_close()


def _call(app, environ) -> tuple[str, list, bytes]:
    got = {}

    def start(status, headers, exc_info=None):
        got["status"], got["headers"] = status, headers

    result = app(environ, start)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return got["status"], got["headers"], body


def _close(sock) -> None:
    """End the connection cleanly (FIN): what was sent arrives, then the body ends early."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _reset(sock) -> None:
    """End the connection with a TCP reset (SO_LINGER 0), as a crashed or restarted server would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultyS3(ThreadedMotoServer):
    """moto's threaded server on 127.0.0.1 with :class:`Faults` in front of its app; stoppable and restartable
    on the same port (moto keeps its buckets in this process, so they survive a restart)."""

    def __init__(self):
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.faults = Faults(self)
        self._restart_lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # faults make werkzeug log broken pipes

    def _server_entry(self) -> None:  # ThreadedMotoServer's, with the middleware around the app
        self.faults.app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self._ip_address, self._port, self.faults, True, request_handler=_QuietHandler)
        self._port = self._server.server_port  # port 0 -> the one picked; a restart reuses it
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def stop(self) -> None:
        super().stop()
        self._server.server_close()  # the port refuses connections now

    def outage(self, seconds: float) -> None:
        with self._restart_lock:
            self.stop()
            time.sleep(seconds)
            self.start()

    def close(self) -> None:
        self.faults.released.set()
        with self._restart_lock:
            self.stop()


class _QuietHandler(MotoRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def log_error(self, *args) -> None:
        pass


def client(endpoint: str, config=None):
    """A plain boto3 client of the test server (botocore's defaults unless ``config``): uploads, checks."""
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1").client("s3", endpoint_url=endpoint, config=config)


def upload_dir(c, folder: Path, bucket: str, prefix: str) -> str:
    """Upload every file of ``folder`` (manifest last) under ``s3://bucket/prefix/``; returns that URL."""
    files = sorted(folder.iterdir(), key=lambda p: (p.name == "manifest.json", p.name))
    for p in files:
        c.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}/"


# ----------------------------------------------------------------------------- fixtures
# A test module takes them with ``from tests.s3util import s3_server, store``; pytest finds fixtures by name
# in the module's namespace, so each module still gets its own server (scope="module").
@pytest.fixture(scope="module")
def s3_server():
    """One faulty moto server with a bucket ``data``, and the test credentials in
    the environment (also for the loader workers and subprocesses started meanwhile)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        server = FaultyS3()
        server.start()
        client(server.url).create_bucket(Bucket="data")
        try:
            yield server
        finally:
            server.close()


@pytest.fixture
def store(s3_server: FaultyS3):
    """The server with no faults, this process's storage settings pointed at it
    (short backoffs); both restored after the test."""
    from segdist import storage

    old = storage.current()
    s3_server.faults.reset()
    storage.configure(endpoint_url=s3_server.url, retries=6, retry_backoff=0.05, cache_dir="", cache_limit=0)
    yield s3_server
    storage.configure(**dataclasses.asdict(old))
    s3_server.faults.reset()
    s3_server.faults.stall_s, s3_server.faults.outage_s = 3.0, 2.0


def env_for(server: FaultyS3) -> dict:
    """Environment of a subprocess that reads ``s3://`` from ``server``."""
    from tests.conftest import REPO

    return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": server.url, "PYTHONPATH": str(REPO),
            "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
