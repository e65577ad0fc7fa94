"""Benchmark: a legitimate user's latency while bad logins arrive, without and with login back-off.

Runs `cbm serve` (uvicorn) twice over the demo run, once with the login defences switched off
(`login_free_failures` and the hash pool so large that every bad login costs a scrypt, as before
issue 15) and once with the defaults. Each time a legitimate user (already logged in, as a running
notebook is) sends parcelByID requests at a fixed rate over one keep-alive connection while
--attackers connections send --bad-logins wrong passwords between them as fast as the server
answers. Clients are told apart by X-Forwarded-For, which uvicorn trusts from loopback, as behind
a reverse proxy. Reports the legitimate user's latency percentiles during the attack, the attack's
answers by status and its duration, as JSON.

    flock /tmp/cbm-bench.lock .venv/bin/python bench/logins.py --out bench/logins.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/, whose markers.py would shadow the markers package
sys.path.insert(1, str(ROOT / "tests"))

from servers import CbmServer  # noqa: E402

from cbm_core.api import run  # noqa: E402
from cbm_plugins.serve._users import make_user, write_users  # noqa: E402

DEMO = ROOT / "demo" / "flanders-2023"
PASSWORD = "bench-password"
OFF = {"login_free_failures": 1_000_000, "login_hash_threads": 40, "login_hash_queue": 100_000}


def auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def prepare(folder: Path) -> Path:
    """The demo run and its signatures, served as dataset fl/2023 to user ann."""
    config = folder / "run.toml"
    config.write_text(
        f'scheme = "ndvi-drop"\n[run]\nout = "out"\n'
        f'[source]\nparcels = "{DEMO / "parcels.gpkg"}"\nscenes = "{DEMO / "scenes.csv"}"\n'
        '[[extract]]\nplugin = "zonal"\ncard = "s2"\nbands = ["B04", "B08", "SCL"]\n'
    )
    run(config, progress=False)
    write_users(folder / "users.json", {"ann": make_user("ann", PASSWORD, ["fl"])})
    return folder


def server_config(folder: Path, name: str, limits: dict[str, int]) -> Path:
    path = folder / f"server-{name}.toml"
    settings = "".join(f"{k} = {v}\n" for k, v in limits.items())
    path.write_text(
        f'[server]\nusers = "users.json"\n{settings}'
        '[[dataset]]\naoi = "fl"\nyear = 2023\n'
        f'source = {{ plugin = "local", parcels = "{DEMO / "parcels.gpkg"}",'
        f' scenes = "{DEMO / "scenes.csv"}" }}\n'
        'store = { plugin = "parquet", path = "out/signatures" }\n'
    )
    return path


def measure(url: str, rate: float, attackers: int, bad_logins: int) -> dict:
    """Latency of the legitimate user before and during the attack, and the attack's answers."""
    legit = requests.Session()
    legit.headers.update({"Authorization": auth("ann", PASSWORD), "X-Forwarded-For": "10.0.0.1"})
    query = f"{url}/query/parcelByID?aoi=fl&year=2023&pid=7"
    assert legit.get(query, timeout=30).status_code == 200  # logged in: the password is verified once

    def legit_requests(seconds: float) -> list[float]:
        latencies, start = [], time.perf_counter()
        for i in range(int(seconds * rate)):
            due = start + i / rate
            time.sleep(max(due - time.perf_counter(), 0))
            sent = time.perf_counter()
            response = legit.get(query, timeout=60)
            latencies.append((time.perf_counter() - sent) * 1000)
            assert response.status_code == 200, response.text
        return latencies

    quiet = legit_requests(2.0)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    per_attacker = bad_logins // attackers
    attack_done = threading.Event()

    def attacker(n: int) -> None:
        session = requests.Session()
        session.headers.update({"Authorization": auth("ann", f"guess-{n}"), "X-Forwarded-For": "10.6.6.6"})
        for _ in range(per_attacker):
            status = session.get(query, timeout=120).status_code
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=attacker, args=(n,)) for n in range(attackers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    during: list[float] = []

    def watch() -> None:
        while not attack_done.is_set():
            during.extend(legit_requests(0.5))

    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.join()
    attack_seconds = time.perf_counter() - started
    attack_done.set()
    watcher.join()

    def summary(values: list[float]) -> dict:
        array = np.asarray(values)
        return {
            "requests": len(values),
            "p50_ms": round(float(np.percentile(array, 50)), 2),
            "p99_ms": round(float(np.percentile(array, 99)), 2),
            "max_ms": round(float(array.max()), 2),
        }

    return {
        "legitimate_quiet": summary(quiet),
        "legitimate_during_attack": summary(during),
        "attack": {
            "bad_logins": per_attacker * attackers,
            "connections": attackers,
            "seconds": round(attack_seconds, 2),
            "answers": dict(sorted(statuses.items())),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="legitimate requests per second")
    parser.add_argument("--attackers", type=int, default=16, help="connections sending bad logins")
    parser.add_argument("--bad-logins", type=int, default=240)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbm-bench-logins-") as tmp:
        folder = prepare(Path(tmp))
        report = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "rate_per_s": args.rate}
        for name, limits in (("defences_off", OFF), ("defences_on", {})):
            server = CbmServer(server_config(folder, name, limits)).start()
            try:
                report[name] = measure(server.url, args.rate, args.attackers, args.bad_logins)
            finally:
                server.stop()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
