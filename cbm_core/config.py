"""Run configuration: TOML files whose relative paths resolve against the file's folder."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbm_core.errors import ConfigError

RUN_SECTIONS = {"run", "source", "store", "extract", "scheme", "marker", "rule", "cluster"}


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
    where: str = "config"  # how to name this table in error messages, e.g. "[source]"

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
        return Params({k: v for k, v in self.options.items() if k not in ("plugin", "name")}, self.base_dir)


def plugin_config(table: Any, where: str, base_dir: Path, default_plugin: str | None = None) -> PluginConfig:
    """Build a PluginConfig from one TOML table, checking it names a plugin."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    name = table.get("plugin", default_plugin)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: missing 'plugin = \"NAME\"' (run 'cbm plugins' to list them)")
    return PluginConfig(plugin=name, options=dict(table), base_dir=base_dir, where=where)


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
    """Which markers to run and which rule turns their results into verdicts."""

    markers: tuple[PluginConfig, ...]
    rule: PluginConfig

    @property
    def marker_names(self) -> list[str]:
        return [marker_name(m) for m in self.markers]


def marker_name(config: PluginConfig) -> str:
    """The label of a configured marker: its 'name' option, else its plugin's name."""
    return str(config.options.get("name", config.plugin))


def parse_scheme(data: Mapping[str, Any], base_dir: Path, origin: str) -> Scheme:
    """Read [[marker]] tables and the [rule] table of a scheme (a recipe file or a run config)."""
    tables = data.get("marker", [])
    if isinstance(tables, Mapping):
        tables = [tables]
    if not tables:
        raise ConfigError(f"{origin}: no [[marker]] table: a scheme needs at least one marker")
    markers = tuple(plugin_config(t, f"{origin} [[marker]] #{i + 1}", base_dir) for i, t in enumerate(tables))
    names = [marker_name(m) for m in markers]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise ConfigError(
            f"{origin}: marker name(s) {', '.join(sorted(repeated))} used twice; set name = ..."
        )
    if "rule" not in data:
        raise ConfigError(f"{origin}: no [rule] table: a scheme needs a decision rule")
    return Scheme(markers, plugin_config(data["rule"], f"{origin} [rule]", base_dir))


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
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(CLUSTER_TYPES))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(CLUSTER_TYPES)}"
        )
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

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_run_config(path: Path) -> RunConfig:
    """Parse and check a run configuration file; errors name the section and key at fault."""
    path = Path(path).resolve()
    data = read_toml(path)
    base = path.parent
    unknown = sorted(set(data) - RUN_SECTIONS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}; expected {', '.join(sorted(RUN_SECTIONS))}"
        )
    run = data.get("run", {})
    out_dir = base / str(run.get("out", "out"))
    if "source" not in data:
        raise ConfigError(f"{path}: no [source] table: say where parcels and scenes come from")
    source = plugin_config(data["source"], "[source]", base, default_plugin="local")
    store_table = dict(data.get("store", {}))
    store_table.setdefault("path", str(out_dir / "signatures"))
    store = plugin_config(store_table, "[store]", base, default_plugin="parquet")
    extract_tables = data.get("extract", [])
    if isinstance(extract_tables, Mapping):
        extract_tables = [extract_tables]
    extract = tuple(plugin_config(t, f"[[extract]] #{i + 1}", base) for i, t in enumerate(extract_tables))
    for job in extract:
        bands = job.get("bands")
        if not isinstance(bands, list) or not bands or not all(isinstance(b, str) for b in bands):
            raise ConfigError(f"{job.where}: 'bands' must be a non-empty list of band names")
    scheme_ref = data.get("scheme")
    if scheme_ref is not None and ("marker" in data or "rule" in data):
        raise ConfigError(f"{path}: give either scheme = ... or [[marker]] and [rule] tables, not both")
    scheme = None if scheme_ref is not None else parse_scheme(data, base, str(path))
    cluster = parse_cluster(data.get("cluster", {}), f"{path} [cluster]")
    return RunConfig(path, out_dir, source, store, extract, scheme, scheme_ref, cluster)


def jobs_by_card(jobs: Sequence[PluginConfig]) -> dict[str, PluginConfig]:
    """The extraction job of each card; a card extracted twice is a configuration mistake."""
    by_card: dict[str, PluginConfig] = {}
    for job in jobs:
        card = job.require("card")
        if card in by_card:
            raise ConfigError(f"{job.where}: card '{card}' is already extracted by {by_card[card].where}")
        by_card[card] = job
    return by_card
