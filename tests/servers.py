"""Throwaway servers for the integration tests: PostgreSQL+PostGIS, moto S3, a fault proxy, `cbm serve`.

Each helper starts a real process (or thread) on a free loopback port and stops it again. A
missing binary is an error, not a skip: the test command installs PostgreSQL, PostGIS and moto.
"""

from __future__ import annotations

import http.client
import http.server
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path(os.environ.get("CBM_PG_BIN", "/usr/lib/postgresql/15/bin"))
ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """A test server could not be started: the message says what is missing."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(
                f"server process exited with code {process.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise ServerError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


# PostgreSQL + PostGIS --------------------------------------------------------------------------


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster in a temporary folder, run as the postgres user, with PostGIS enabled."""

    port: int = field(default_factory=free_port)
    dbname: str = "cbm"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cbm-pg-")))
    keep: bool = False  # keep the data folder on stop (benchmarks reuse a large store)
    settings: tuple[str, ...] = ()  # extra `-c name=value` server settings

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={self.dbname} user=postgres connect_timeout=5"

    def _as_postgres(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> PostgresCluster:
        initdb = PG_BIN / "initdb"
        if not initdb.exists():
            raise ServerError(f"{initdb} not found: install the Debian packages postgresql-15 and postgis")
        extension = Path("/usr/share/postgresql/15/extension/postgis.control")
        if not extension.exists():
            raise ServerError(f"{extension} not found: install the Debian package postgresql-15-postgis-3")
        if (self.root / "data" / "PG_VERSION").exists():  # an existing cluster: just start it
            self._pg_ctl("start")
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            self._as_postgres(str(initdb), "-D", str(self.root / "data"), "-U", "postgres", "--auth=trust"),
            check=True,
            capture_output=True,
        )
        self._pg_ctl("start")
        import psycopg

        for dsn, statement in (
            (self.dsn.replace(f"dbname={self.dbname}", "dbname=postgres"), f"CREATE DATABASE {self.dbname}"),
            (self.dsn, "CREATE EXTENSION IF NOT EXISTS postgis"),
        ):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(statement)
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=60" + "".join(f" -c {x}" for x in self.settings)
        )
        subprocess.run(
            self._as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                "-o", options, "-w", "-t", "60", *extra, action,
            ),
            check=True,
            capture_output=True,
        )  # fmt: skip

    def restart(self, mode: str = "fast") -> None:
        """Restart the server, dropping every open connection (what a failover looks like to clients)."""
        self._pg_ctl("restart", "-m", mode)

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "fast" if self.keep else "immediate")
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


# moto S3 ---------------------------------------------------------------------------------------


@dataclass
class MotoServer:
    """moto's standalone S3-compatible server on loopback."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        binary = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        if not Path(binary).exists():
            raise ServerError("moto_server not found: pip install 'moto[server]'")
        self.process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def s3_client(endpoint: str):  # boto3 client for test set-up
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# Fault-injecting HTTP proxy ----------------------------------------------------------------------


@dataclass
class FaultProxy:
    """An HTTP proxy in front of moto that counts bytes and injects throttling, 5xx and denials.

    ``fail_next`` answers that many requests with 503 SlowDown before forwarding again;
    requests whose path contains one of ``denied`` get 403 AccessDenied.
    """

    upstream_port: int
    port: int = field(default_factory=free_port)
    fail_next: int = 0
    denied: tuple[str, ...] = ()
    bytes_served: int = 0
    requests: int = 0
    failures_sent: int = 0
    _server: socketserver.ThreadingTCPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.fail_next = 0
            self.denied = ()
            self.bytes_served = self.requests = self.failures_sent = 0

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    failing = proxy.fail_next > 0
                    if failing:
                        proxy.fail_next -= 1
                        proxy.failures_sent += 1
                    denied = any(d in self.path for d in proxy.denied)
                if failing or denied:
                    status, code = (503, "SlowDown") if failing else (403, "AccessDenied")
                    payload = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.bytes_served += len(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# cbm serve under uvicorn -------------------------------------------------------------------------


@dataclass
class CbmServer:
    """`cbm serve CONFIG` in a subprocess (uvicorn), on a free loopback port."""

    config: Path
    port: int = field(default_factory=free_port)
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CbmServer:
        self.log = Path(tempfile.mkstemp(prefix="cbm-serve-", suffix=".log")[1])
        code = "from cbm_plugins.serve import main; main()"
        args = [sys.executable, "-c", code, str(self.config), "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--workers", str(self.workers)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                args, cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(self.port, timeout=60, process=self.process)
        except ServerError as exc:
            raise ServerError(f"{exc}\n{self.log.read_text()}") from None
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.unlink(missing_ok=True)


def started(make: Callable[[], object]) -> object:
    """Start a server object, turning a failed command into a ServerError that shows its output."""
    try:
        return make()
    except subprocess.CalledProcessError as exc:
        raise ServerError(
            f"{exc.cmd!r} failed: {exc.stderr.decode(errors='replace') if exc.stderr else ''}"
        ) from None


def band_rows(catalogue):
    """A catalogue's band files as a sorted table (NaN nodata compares equal), for comparisons."""
    import pandas as pd

    rows = [
        {
            "obsid": obsid,
            "band": band,
            "uri": ref.uri,
            "nodata": ref.nodata,
            "scale": ref.scale,
            "offset": ref.offset,
        }
        for obsid, bands in zip(catalogue["obsid"], catalogue["bands"], strict=True)
        for band, ref in bands.items()
    ]
    return pd.DataFrame(rows).sort_values(["obsid", "band"], ignore_index=True)


def upload_demo(client, bucket: str, prefix: str = "flanders/") -> None:
    """The demo folder (COGs, scenes.csv, parcels.gpkg) into a bucket, keeping its layout."""
    demo = ROOT / "demo" / "flanders-2023"
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for path in sorted(demo.rglob("*")):
        if path.is_file() and path.suffix in (".tif", ".csv", ".gpkg"):
            client.upload_file(str(path), bucket, prefix + str(path.relative_to(demo)))


@dataclass
class TileServer:
    """An XYZ tile service on loopback: /{z}/{x}/{y}.png answers a 256 x 256 PNG it makes (a colour
    from x and y, so that a mosaic shows where each tile went); counts the tiles it served."""

    port: int = field(default_factory=free_port)
    served: int = 0
    missing: bool = False  # answer 404 for every tile (a service without imagery there)
    _server: socketserver.ThreadingTCPServer | None = None

    @property
    def template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{z}}/{{x}}/{{y}}.png"

    @staticmethod
    def tile_png(x: int, y: int) -> bytes:
        import warnings

        import numpy as np
        from rasterio.errors import NotGeoreferencedWarning
        from rasterio.io import MemoryFile

        pixels = np.empty((3, 256, 256), np.uint8)
        pixels[0], pixels[1], pixels[2] = (x * 37) % 256, (y * 59) % 256, 128
        with warnings.catch_warnings(), MemoryFile() as memory:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # tiles are placed by their URL
            with memory.open(driver="PNG", width=256, height=256, count=3, dtype="uint8") as png:
                png.write(pixels)
            return memory.read()

    def start(self) -> TileServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.strip("/").removesuffix(".png").split("/")
                if owner.missing or len(parts) != 3 or not all(p.isdigit() for p in parts):
                    self.send_error(404)
                    return
                body = owner.tile_png(int(parts[1]), int(parts[2]))
                owner.served += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
