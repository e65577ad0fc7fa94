"""Parquet signature store: one file per scene, so writing a scene again replaces it.

Layout under `path`: ``stats/<obsid>.parquet`` and ``scl/<obsid>.parquet``. Each file is written
to a temporary name and renamed into place, so a crash or a full disk never leaves a partial
scene behind, and a scene counts as stored only once its stats file exists (written last).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import HIST_COLUMNS, STATS, Signatures, empty_scl, empty_signatures

CBM_OPTIONS = frozenset({"path"})  # the [store] options it reads

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
READABLE_CHARS = 120  # Sentinel product ids are ~65 characters; the catalogue allows 120
STATS_SCHEMA = pa.schema(
    [("pid", pa.int64()), ("obsid", pa.string()), ("band", pa.string()), ("count", pa.int64())]
    + [(s, pa.float64()) for s in STATS if s != "count"]
)
SCL_SCHEMA = pa.schema(
    [("pid", pa.int64()), ("obsid", pa.string())] + [(h, pa.int64()) for h in HIST_COLUMNS]
)


@impl
def cbm_store_write(config: PluginConfig, signatures: Signatures, obsids: Sequence[str]) -> int:
    root = config.path("path")
    stats_by_scene = dict(tuple(signatures.stats.groupby("obsid", sort=False)))
    scl_by_scene = dict(tuple(signatures.scl.groupby("obsid", sort=False)))
    for obsid in obsids:
        scl = scl_by_scene.get(obsid, empty_scl())
        stats = stats_by_scene.get(obsid, empty_signatures())
        _write_atomic(scl, SCL_SCHEMA, root / "scl" / scene_file(obsid), obsid)
        _write_atomic(stats, STATS_SCHEMA, root / "stats" / scene_file(obsid), obsid)
    return len(signatures.stats) + len(signatures.scl)


@impl
def cbm_store_read(
    config: PluginConfig,
    pids: Sequence[int] | None,
    obsids: Sequence[str] | None,
    bands: Sequence[str] | None,
) -> Signatures:
    root = config.path("path")
    stats = _read(root / "stats", STATS_SCHEMA, pids, obsids, bands, empty_signatures())
    scl = _read(root / "scl", SCL_SCHEMA, pids, obsids, None, empty_scl())
    return Signatures(stats, scl)


@impl
def cbm_store_obsids(config: PluginConfig) -> set[str]:
    folder = config.path("path") / "stats"
    if not folder.is_dir():
        return set()
    return {_read_obsid(f) for f in folder.glob("*.parquet")}


def scene_file(obsid: str) -> str:
    """A file name for a scene that is safe on every file system and still readable: at most
    READABLE_CHARS of the obsid (names stay under the usual 255-byte limit with the temporary
    prefix and suffix), then a hash of the whole obsid that keeps distinct scenes apart."""
    readable = SAFE_NAME.sub("_", obsid)[:READABLE_CHARS]
    return f"{readable}-{hashlib.sha1(obsid.encode()).hexdigest()[:8]}.parquet"


def _write_atomic(frame: pd.DataFrame, schema: pa.Schema, target: Path, obsid: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    table = pa.Table.from_pandas(
        frame[schema.names].reset_index(drop=True), schema=schema, preserve_index=False
    )
    table = table.replace_schema_metadata({b"cbm.obsid": obsid.encode()})
    try:
        pq.write_table(table, temporary, compression="zstd")
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InputError(f"cannot write signatures to {target.parent}: {exc.strerror or exc}") from None


def _read_obsid(file: Path) -> str:
    return pq.read_schema(file).metadata[b"cbm.obsid"].decode()


def _read(folder: Path, schema: pa.Schema, pids, obsids, bands, empty: pd.DataFrame) -> pd.DataFrame:
    if not folder.is_dir():
        return empty
    if obsids is not None:
        files = [folder / scene_file(o) for o in obsids if (folder / scene_file(o)).exists()]
    else:
        files = sorted(folder.glob("*.parquet"))
    if not files:
        return empty
    dataset = ds.dataset(files, format="parquet", schema=schema)
    condition = None
    for column, values in (("pid", pids), ("band", bands)):
        if values is not None:
            term = ds.field(column).isin(list(values))
            condition = term if condition is None else condition & term
    frame = dataset.to_table(filter=condition).to_pandas()
    return frame.astype(empty.dtypes.to_dict())
