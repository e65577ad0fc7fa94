"""Shared fixtures: the bundled demo data and run configurations pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "flanders-2023"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


def write_config(tmp_path: Path, body: str = "", scheme: str = 'scheme = "ndvi-drop"') -> Path:
    """A run config over the demo data with outputs in tmp_path; `body` adds or overrides tables."""
    config = tmp_path / "run.toml"
    source = (
        ""
        if "[source]" in body
        else f"""
[source]
plugin = "local"
parcels = "{DEMO / "parcels.gpkg"}"
scenes = "{DEMO / "scenes.csv"}"
"""
    )
    extract = (
        ""
        if "[[extract]]" in body
        else """
[[extract]]
card = "s2"
plugin = "zonal"
bands = ["B04", "B08", "SCL"]
"""
    )
    config.write_text(f'{scheme}\n[run]\nout = "out"\n{source}{extract}{body}')
    return config


@pytest.fixture
def demo_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


# Real servers for the PostGIS / S3 / REST tests (tests/servers.py) -------------------------------


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL + PostGIS cluster on a free loopback port."""
    from servers import PostgresCluster, started

    cluster = started(lambda: PostgresCluster().start())
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def moto():
    """moto's S3 server on loopback."""
    from servers import MotoServer, started

    server = started(lambda: MotoServer().start())
    yield server
    server.stop()


@pytest.fixture
def s3_proxy(moto):
    """A fault-injecting, byte-counting proxy in front of moto (fresh counters per test)."""
    from servers import FaultProxy

    proxy = FaultProxy(moto.port).start()
    yield proxy
    proxy.stop()
