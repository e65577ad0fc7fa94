"""Run configuration: TOML files whose relative paths resolve against the file's folder."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbm_core.errors import ConfigError
from cbm_core.model import CARDS, VALIDITY_KEYS, ValidityPolicy

# The schema of a configuration: the keys each table accepts. A plugin's table ([source], [store],
# [[extract]], [[marker]], [rule]) also accepts the options its plugin declares (CBM_OPTIONS, checked
# by the Engine once the plugins are loaded). To add a key or a section, add it here: every table is
# checked against these sets, and a mistake is refused with the valid keys and a did-you-mean.
RUN_KEYS: dict[str, frozenset[str]] = {  # top level of a run configuration -> keys of that table
    "run": frozenset({"out"}),
    "source": frozenset({"plugin"}),
    "store": frozenset({"plugin"}),
    "extract": frozenset({"plugin", "card", "bands"}),
    "cluster": frozenset(),  # filled below from CLUSTER_TYPES
    # plots, reports and the workbench: a folder of Jinja2 report templates first on the template
    # path, and an orthophoto (any raster GDAL opens) as map background
    "analyst": frozenset({"templates", "orthophoto", "meteo"}),
}
SCHEME_KEYS: dict[str, frozenset[str]] = {  # a scheme: a recipe file, or inline in a run configuration
    # optional = true: a marker whose bands the data lack is not run (its parcels stay yellow,
    # saying which band is missing) instead of refusing the whole configuration
    "marker": frozenset({"plugin", "name", "optional"}),
    "rule": frozenset({"plugin"}),
    "validity": frozenset(VALIDITY_KEYS),  # the observation-validity policy (cbm_core.model.ValidityPolicy)
    # the declared crops the scheme judges (codes and/or names); other declared parcels are "not
    # applicable", parcels without a declared crop are always judged
    "applies_to": frozenset({"crop_codes", "crop_names"}),
}
# Marker options that would give one marker its own idea of a clear observation: the scheme's
# [validity] table is the one place for that.
RETIRED_MARKER_KEYS = ("cloud_classes", "max_cloudy", "require_scl", "validity")
DEFAULT_STORE = "parquet"  # the signature store when a configuration has no [store] plugin, in out/signatures
RUN_VALUES = frozenset({"scheme"})  # top-level keys of a run configuration that are values, not tables
SERVER_KEYS: dict[str, frozenset[str]] = {  # a `cbm serve` configuration (limits: see the server plugin)
    "server": frozenset({"users", "chip_dir"}),
    "dataset": frozenset({"aoi", "year", "source", "store", "results", "verdicts", "meteo", "backgrounds"}),
}


def check_keys(table: Mapping[str, Any], allowed: Collection[str], where: str, what: str = "key") -> None:
    """Refuse a key the schema does not know, naming it, a close valid key and all valid keys.

    A misspelt key silently ignored is worse than an error: `[run] otu = ...` would send results
    to the default folder, over an earlier run's.
    """
    unknown = [str(k) for k in table if k not in allowed]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    valid = ", ".join(sorted(allowed)) or "none"
    raise ConfigError(f"{where}: unknown {what} '{key}'{hint}; valid {what}s: {valid}")


def check_table(table: Any, where: str) -> Mapping[str, Any]:
    """A TOML value that must be a table (``[name]``), not a value or an array of them."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    return table


def tables(value: Any, where: str) -> list[Mapping[str, Any]]:
    """The tables of a ``[[name]]`` array (a single ``[name]`` table counts as one)."""
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected [[tables]], got {type(value).__name__}")
    return [check_table(t, f"{where} #{i + 1}") for i, t in enumerate(items)]


def resolve_path(value: Any, base_dir: Path) -> Path:
    """A configured file or folder: absolute (or ~) as given, relative against base_dir."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


class Params(dict):
    """A marker's or rule's parameters: a plain dict to plugins that also remembers the folder of the
    file that declared them, so that path options resolve there and not in the working directory."""

    def __init__(self, options: Mapping[str, Any] | None = None, base_dir: Path = Path(".")) -> None:
        super().__init__(options or {})
        self.base_dir = Path(base_dir)

    def path(self, key: str, default: str | None = None) -> Path:
        """An option naming a file or folder, resolved against the declaring file's folder."""
        value = self.get(key, default)
        if value is None:
            raise ConfigError(f"missing option '{key}'")
        return resolve_path(value, self.base_dir)


def param_path(params: Mapping[str, Any], key: str, default: str | None = None) -> Path:
    """``params.path(key)`` for Params from a configuration; a plain dict (a direct Python call)
    resolves against the working directory."""
    return Params(params, getattr(params, "base_dir", Path("."))).path(key, default)


@dataclass(frozen=True)
class PluginConfig:
    """The options a configuration gives one plugin, and where to resolve its relative paths."""

    plugin: str
    options: Mapping[str, Any] = field(default_factory=dict)
    base_dir: Path = Path(".")
    where: str = "config"  # how to name this table in error messages, e.g. "run.toml [source]"
    keys: frozenset[str] = frozenset({"plugin"})  # the table's own keys; the rest are plugin options

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.options:
            raise ConfigError(f"{self.where}: missing option '{key}' for plugin '{self.plugin}'")
        return self.options[key]

    def path(self, key: str, default: str | None = None) -> Path:
        """An option naming a file or folder, resolved against the configuration's folder."""
        value = self.options.get(key, default)
        if value is None:
            raise ConfigError(f"{self.where}: missing option '{key}' for plugin '{self.plugin}'")
        return resolve_path(value, self.base_dir)

    @property
    def params(self) -> Params:
        """Options other than the plugin's name and label: a marker's or rule's parameters, which
        keep this table's base_dir for their path options (Params.path)."""
        engine_keys = ("plugin", "name", "optional")
        return Params({k: v for k, v in self.options.items() if k not in engine_keys}, self.base_dir)


def plugin_config(
    table: Any,
    where: str,
    base_dir: Path,
    default_plugin: str | None = None,
    keys: Collection[str] = ("plugin",),
) -> PluginConfig:
    """Build a PluginConfig from one TOML table, checking it names a plugin.

    keys: the table's own keys (its section's schema); any other key must be an option the plugin
    declares (checked by Engine.check_options once plugins are loaded).
    """
    check_table(table, where)
    name = table.get("plugin", default_plugin)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: missing 'plugin = \"NAME\"' (run 'cbm plugins' to list them)")
    return PluginConfig(
        plugin=name, options=dict(table), base_dir=base_dir, where=where, keys=frozenset(keys)
    )


def read_toml(path: Path, what: str = "configuration") -> dict[str, Any]:
    """Read a TOML file, turning the usual mistakes into messages naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None


@dataclass(frozen=True)
class Scheme:
    """Which markers to run, which rule turns their results into verdicts, and which observations count."""

    markers: tuple[PluginConfig, ...]
    rule: PluginConfig
    validity: ValidityPolicy = field(default_factory=ValidityPolicy)
    crop_codes: frozenset[str] = frozenset()  # [applies_to]: empty codes and names = every parcel
    crop_names: frozenset[str] = frozenset()  # (case-insensitive)
    skipped: Mapping[str, str] = field(default_factory=dict)  # optional markers not run: name -> why

    @property
    def marker_names(self) -> list[str]:
        return [marker_name(m) for m in self.markers]

    @property
    def scope(self) -> str:
        """The declared crops the scheme judges, in words."""
        named = [*sorted(self.crop_codes), *sorted(self.crop_names)]
        return ", ".join(named) if named else "every crop"

    def applicable(self, parcels: pd.DataFrame) -> np.ndarray:
        """Which parcels (a frame with crop_code, crop_name) the scheme judges: a bool array.

        A parcel whose declared crop code or name is listed in [applies_to] is judged, and so is a
        parcel with no declared crop at all (signatures scored without declarations).
        """
        n = len(parcels)
        if not self.crop_codes and not self.crop_names:
            return np.ones(n, dtype=bool)
        codes = parcels["crop_code"].astype("string").fillna("").str.strip().to_numpy(object)
        names = parcels["crop_name"].astype("string").fillna("").str.strip().str.casefold().to_numpy(object)
        undeclared = (codes == "") & (names == "")
        return undeclared | np.isin(codes, list(self.crop_codes)) | np.isin(names, list(self.crop_names))

    def params(self, config: PluginConfig) -> Params:
        """A marker's or the rule's parameters with the scheme's validity policy under "validity"."""
        params = config.params
        params["validity"] = self.validity
        return params


def marker_name(config: PluginConfig) -> str:
    """The label of a configured marker: its 'name' option, else its plugin's name."""
    return str(config.options.get("name", config.plugin))


def parse_scheme(data: Mapping[str, Any], base_dir: Path, origin: str) -> Scheme:
    """Read [[marker]] tables and the [rule] table of a scheme (a recipe file or a run config)."""
    found = tables(data.get("marker", []), f"{origin} [[marker]]")
    if not found:
        raise ConfigError(f"{origin}: no [[marker]] table: a scheme needs at least one marker")
    markers = tuple(
        plugin_config(t, f"{origin} [[marker]] #{i + 1}", base_dir, keys=SCHEME_KEYS["marker"])
        for i, t in enumerate(found)
    )
    for marker in markers:
        retired = [k for k in RETIRED_MARKER_KEYS if k in marker.options]
        if retired:
            raise ConfigError(
                f"{marker.where}: option(s) {', '.join(retired)} belong in the scheme's [validity] table "
                "(one observation-validity policy for every marker, rule and plot)"
            )
    names = [marker_name(m) for m in markers]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise ConfigError(
            f"{origin}: marker name(s) {', '.join(sorted(repeated))} used twice; set name = ..."
        )
    if "rule" not in data:
        raise ConfigError(f"{origin}: no [rule] table: a scheme needs a decision rule")
    validity = ValidityPolicy.from_table(data.get("validity"), f"{origin} [validity]")
    codes, names = parse_applies_to(data.get("applies_to", {}), f"{origin} [applies_to]")
    return Scheme(
        markers,
        plugin_config(data["rule"], f"{origin} [rule]", base_dir, keys=SCHEME_KEYS["rule"]),
        validity,
        codes,
        names,
    )


def parse_applies_to(table: Any, where: str) -> tuple[frozenset[str], frozenset[str]]:
    """The crop codes and (case-folded) crop names of an [applies_to] table."""
    applies = check_table(table, where)
    check_keys(applies, SCHEME_KEYS["applies_to"], where)
    crops = {}
    for key in ("crop_codes", "crop_names"):
        listed = applies.get(key, [])
        if not isinstance(listed, list) or not all(
            isinstance(c, str | int) and str(c).strip() for c in listed
        ):
            raise ConfigError(f"{where}: '{key}' must list crop codes or names, got {listed!r}")
        crops[key] = frozenset(
            str(c).strip() if key == "crop_codes" else str(c).strip().casefold() for c in listed
        )
    return crops["crop_codes"], crops["crop_names"]


def load_scheme(path: Path) -> Scheme:
    """A scheme recipe file: [[marker]] tables and a [rule] table, nothing else."""
    data = read_toml(path, "scheme")
    check_keys(data, SCHEME_KEYS, str(path), "section")
    return parse_scheme(data, Path(path).parent, str(path))


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how a run scales out on dask.distributed ([cluster] table or `cbm run` options).

    Neither an address nor a worker count means single-process, the default.
    """

    address: str | None = None  # tcp://HOST:PORT of a running dask scheduler
    workers: int | None = None  # or start a local cluster of this many worker processes
    threads_per_worker: int = 1
    memory_limit: str = "auto"  # per local worker, e.g. "4GiB"; dask spills and restarts past it
    retries: int = 2  # extra attempts for a unit that raises (a killed worker is rescheduled besides)
    partition_size: int = 20_000  # most parcels per marker unit: bounds a worker's memory
    claim_wait: float = 600.0  # seconds to wait for scenes another run has claimed before giving up

    @property
    def enabled(self) -> bool:
        return self.address is not None or self.workers is not None


CLUSTER_TYPES = {
    "address": str,
    "workers": int,
    "threads_per_worker": int,
    "memory_limit": str,
    "retries": int,
    "partition_size": int,
    "claim_wait": (int, float),
}


def parse_cluster(table: Any, where: str = "[cluster]") -> ClusterConfig:
    """Check a [cluster] table: known keys, right types, positive counts."""
    check_keys(check_table(table, where), CLUSTER_TYPES, where)
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, CLUSTER_TYPES[key]):
            raise ConfigError(f"{where}: '{key}' has the wrong type ({value!r})")
        if key in ("workers", "threads_per_worker", "partition_size") and value < 1:
            raise ConfigError(f"{where}: '{key}' must be at least 1, got {value}")
        if key in ("retries", "claim_wait") and value < 0:
            raise ConfigError(f"{where}: '{key}' must not be negative, got {value}")
    if "address" in table and "workers" in table:
        raise ConfigError(f"{where}: give either address (a running scheduler) or workers (a local cluster)")
    return ClusterConfig(**table)


RUN_KEYS["cluster"] = frozenset(CLUSTER_TYPES)


@dataclass(frozen=True)
class RunConfig:
    """A whole `cbm run` configuration."""

    path: Path
    out_dir: Path
    source: PluginConfig
    store: PluginConfig
    extract: tuple[PluginConfig, ...]
    scheme: Scheme | None  # None until resolved against the plugins' scheme recipes
    scheme_ref: str | None  # a recipe name or file given as `scheme = ...`
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    analyst: PluginConfig = field(default_factory=lambda: PluginConfig("analyst", where="[analyst]"))
    applies_to: tuple[frozenset[str], frozenset[str]] | None = None  # [applies_to] beside a recipe

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_run_config(path: Path) -> RunConfig:
    """Parse and check a run configuration file; errors name the file, section and key at fault."""
    path = Path(path).resolve()
    data = read_toml(path)
    base = path.parent
    check_keys(data, {*RUN_KEYS, *SCHEME_KEYS, *RUN_VALUES}, str(path), "section")
    run = check_table(data.get("run", {}), f"{path} [run]")
    check_keys(run, RUN_KEYS["run"], f"{path} [run]")
    out = run.get("out", "out")
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"{path} [run]: 'out' must be a folder name, got {out!r}")
    out_dir = resolve_path(out, base)
    if "source" not in data:
        raise ConfigError(f"{path}: no [source] table: say where parcels and scenes come from")
    source = plugin_config(data["source"], f"{path} [source]", base, "local", RUN_KEYS["source"])
    store_table = dict(check_table(data.get("store", {}), f"{path} [store]"))
    if store_table.get("plugin", DEFAULT_STORE) == DEFAULT_STORE:
        store_table.setdefault("path", str(out_dir / "signatures"))
    store = plugin_config(store_table, f"{path} [store]", base, DEFAULT_STORE, RUN_KEYS["store"])
    extract = tuple(
        plugin_config(t, f"{path} [[extract]] #{i + 1}", base, keys=RUN_KEYS["extract"])
        for i, t in enumerate(tables(data.get("extract", []), f"{path} [[extract]]"))
    )
    for job in extract:
        check_job(job)
    scheme_ref = data.get("scheme")
    if scheme_ref is not None and ("marker" in data or "rule" in data or "validity" in data):
        raise ConfigError(
            f"{path}: give either scheme = ... or [[marker]], [rule] and [validity] tables, not both"
        )
    if scheme_ref is not None and (not isinstance(scheme_ref, str) or not scheme_ref):
        raise ConfigError(f"{path}: scheme must be a recipe name or a file, got {scheme_ref!r}")
    scheme = None if scheme_ref is not None else parse_scheme(data, base, str(path))
    # with a recipe, the dataset says which of its declared crops the recipe judges
    applies_to = (
        parse_applies_to(data["applies_to"], f"{path} [applies_to]")
        if scheme_ref is not None and "applies_to" in data
        else None
    )
    cluster = parse_cluster(data.get("cluster", {}), f"{path} [cluster]")
    analyst_table = check_table(data.get("analyst", {}), f"{path} [analyst]")
    check_keys(analyst_table, RUN_KEYS["analyst"], f"{path} [analyst]")
    analyst = PluginConfig("analyst", dict(analyst_table), base, f"{path} [analyst]")
    return RunConfig(path, out_dir, source, store, extract, scheme, scheme_ref, cluster, analyst, applies_to)


def check_job(job: PluginConfig) -> None:
    """An [[extract]] table: a known card and a non-empty list of band names."""
    card = job.get("card")
    if card not in CARDS:
        hint = difflib.get_close_matches(str(card), CARDS, n=1)
        guess = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"{job.where}: card {card!r} is not a known card{guess}; valid cards: {', '.join(CARDS)}"
        )
    bands = job.get("bands")
    if not isinstance(bands, list) or not bands or not all(isinstance(b, str) and b for b in bands):
        raise ConfigError(f"{job.where}: 'bands' must be a non-empty list of band names")


def jobs_by_card(jobs: Sequence[PluginConfig]) -> dict[str, PluginConfig]:
    """The extraction job of each card; a card extracted twice is a configuration mistake."""
    by_card: dict[str, PluginConfig] = {}
    for job in jobs:
        card = job.require("card")
        if card in by_card:
            raise ConfigError(f"{job.where}: card '{card}' is already extracted by {by_card[card].where}")
        by_card[card] = job
    return by_card
