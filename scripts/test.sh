#!/usr/bin/env bash
# Install everything the tests need and run the whole suite: lint, then pytest, which starts
# and stops real servers (a throwaway PostgreSQL+PostGIS cluster, an S3-compatible server,
# `cbm serve` under uvicorn, a dask LocalCluster) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! ls /usr/share/postgresql/*/extension/postgis.control >/dev/null 2>&1; then
  apt_install postgresql postgis
  pg_major=$(ls /usr/lib/postgresql | sort -n | tail -1)
  apt_install "postgresql-${pg_major}-postgis-3"
fi
command -v chromium >/dev/null 2>&1 || apt_install chromium chromium-driver
pip install -q -e ".[all,docs,test]" ./examples/cbm-example-plugin 2>&1 | grep -v "^WARNING: Location" || true
# The unchanged JRC client (tests/test_jrc_client.py) in its own virtualenv, so that its pins
# (pandas < 2: it calls DataFrame.append) never touch ours.
if [ ! -x .venv-jrc/bin/python ]; then python -m venv .venv-jrc; fi
.venv-jrc/bin/python -m pip install -q "cbm==0.0.18" "pandas<2" "numpy<2" 2>&1 | grep -v "^WARNING: Location" || true
ruff format --check .
ruff check .
# Coverage of every package, subprocesses included ([tool.coverage] in pyproject.toml); each package
# must keep its floor (docs/testing.md: numba kernels are excluded by rule, not by hand).
python -m pytest --cov --cov-report= "$@"
python -m coverage report --skip-covered --skip-empty --sort=cover | tail -25
if [ $# -eq 0 ]; then  # floors hold for the whole suite, not for a selection of tests
  for floor in cbm_core:89 sources:89 extractors:95 markers:95 cbm_plugins:93; do  # docs/testing.md
    package=${floor%%:*}
    echo "coverage of $package: $(python -m coverage report --include="$package/*" --format=total)% (floor ${floor##*:}%)"
    python -m coverage report --include="$package/*" --fail-under="${floor##*:}" >/dev/null
  done
fi
