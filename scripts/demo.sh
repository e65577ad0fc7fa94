#!/usr/bin/env bash
# Install cbm-engine in .venv and run the main job on the bundled real demo data (embedded
# default: local files, no server): grassland mowing and a crop-declaration check over two full
# seasons (demo/flanders-seasons), then April 2023 (demo/flanders-2023). Outputs in demo/out/:
# seasons-mowing/, seasons-crops/ (verdicts.gpkg/csv, markers.parquet, events.parquet/csv,
# summary.json), the shared signature store seasons-signatures/, and the April run in demo/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
cbm run demo/seasons-mowing.toml
cbm run demo/seasons-crops.toml      # same store: nothing extracted twice
cbm run demo/flanders.toml
