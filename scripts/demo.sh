#!/usr/bin/env bash
# Install cbm-engine in .venv and run the main job on the bundled real demo data (embedded
# default: local files, no server). Outputs: demo/out/verdicts.gpkg, verdicts.csv,
# markers.parquet, summary.json and the signature store demo/out/signatures/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
cbm run demo/flanders.toml
