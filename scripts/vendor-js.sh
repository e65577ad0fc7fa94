#!/usr/bin/env bash
# Refresh the JavaScript the workbench vendors (never fetched at run time): Leaflet, pinned, from
# the npm registry, checked against its published integrity, with its licence.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.9.4
INTEGRITY="sha512-nxS1ynzJOmOlHp+iL3FyWqK89GtNL8U8rvlMOsQdTTssxZwCXh8N2NB3GDQOL+YR3XnWyZAxwQixURb+FA74PA=="
target=cbm_plugins/workbench/static/vendor/leaflet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "leaflet@${VERSION}" --silent >/dev/null)
actual="sha512-$(openssl dgst -sha512 -binary "$work/leaflet-${VERSION}.tgz" | base64 -w0)"
[ "$actual" = "$INTEGRITY" ] || { echo "leaflet-${VERSION}.tgz: integrity $actual, expected $INTEGRITY" >&2; exit 1; }
tar -xzf "$work/leaflet-${VERSION}.tgz" -C "$work"
mkdir -p "$target/images"
cp "$work/package/dist/leaflet.js" "$work/package/dist/leaflet.css" "$work/package/LICENSE" "$target/"
cp "$work/package/dist/images/layers.png" "$work/package/dist/images/layers-2x.png" "$target/images/"
echo "Leaflet ${VERSION} vendored into $target"
