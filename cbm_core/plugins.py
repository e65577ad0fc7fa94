"""Plugin discovery: built-ins from registry.toml and third-party plugins from entry points.

Both kinds load through the same path (import module, check its API version, register), so a
PyPI plugin can do whatever a built-in does. Environment:

* ``CBM_DISABLED_PLUGINS=a,b``: never load these plugins (built-in or not).
* ``CBM_TRACE_PLUGINS=1``: print every hook call and its result to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from cbm_core import hookspecs
from cbm_core.config import PluginConfig, check_keys
from cbm_core.errors import PluginError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "cbm"
CORE_API_VERSION = "1.0"
DISABLED_ENV = "CBM_DISABLED_PLUGINS"
TRACE_ENV = "CBM_TRACE_PLUGINS"
OPTIONS_ATTRIBUTE = "CBM_OPTIONS"  # module-level set of the option keys a plugin reads from its table
FAMILIES = ("source", "extractor", "store", "marker", "rule", "cli", "web")


@dataclass(frozen=True)
class PluginInfo:
    """What `cbm plugins` shows about one registered plugin."""

    name: str
    version: str
    kind: str
    hooks: list[str]
    origin: str  # "built-in" or "entry point"
    module: str
    description: str = ""
    options: frozenset[str] | None = None  # CBM_OPTIONS: the option keys it accepts; None: not declared


@dataclass
class PluginManager:
    """A pluggy manager that remembers where each plugin came from and which were refused."""

    pm: pluggy.PluginManager = field(default_factory=lambda: _new_pluggy())
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # plugin name -> why
    _callers: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register(
        self, module: ModuleType, name: str, origin: str = "test", version: str = "0", description: str = ""
    ) -> bool:
        """Register one plugin module unless it is blocked or made for another core API."""
        if self.pm.is_blocked(name):
            self.refused[name] = f"disabled by {DISABLED_ENV}"
            return False
        wanted = str(getattr(module, "CBM_API_VERSION", CORE_API_VERSION))
        if not api_compatible(wanted, CORE_API_VERSION):
            why = (
                f"plugin '{name}' ({module.__name__}) needs cbm core API {wanted}, "
                f"but this cbm-engine provides core API {CORE_API_VERSION}; plugin not loaded"
            )
            self.refused[name] = why
            return False
        try:
            options = _declared_options(module, name)
        except PluginError as exc:
            self.refused[name] = str(exc)
            return False
        self.pm.register(module, name=name)
        hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        self.infos[name] = PluginInfo(
            name=name,
            version=version,
            kind=", ".join(plugin_kinds(hooks)) or "none",
            hooks=hooks,
            origin=origin,
            module=module.__name__,
            description=description or _first_line(module.__doc__),
            options=options,
        )
        return True

    def check_options(self, config: PluginConfig) -> None:
        """Refuse an option the configured plugin does not declare (with a did-you-mean).

        A plugin declares the keys it reads as a module-level ``CBM_OPTIONS`` set; one that
        declares nothing (an older third-party plugin) gets every option unchecked.
        """
        info = self.infos.get(config.plugin)
        if info is None or info.options is None:
            return
        check_keys(config.options, config.keys | info.options, f"{config.where} (plugin '{config.plugin}')")

    def caller(self, plugin: str, hook_name: str, where: str) -> Callable[..., Any]:
        """The hook as implemented by one named plugin (the one a configuration chose)."""
        if plugin not in self.infos:
            known = ", ".join(sorted(n for n, i in self.infos.items() if hook_name in i.hooks))
            reason = f" ({self.refused[plugin]})" if plugin in self.refused else ""
            raise PluginError(
                f"{where}: no plugin named '{plugin}'{reason}; plugins that can: {known or 'none'}"
            )
        if hook_name not in self.infos[plugin].hooks:
            known = ", ".join(sorted(n for n, i in self.infos.items() if hook_name in i.hooks))
            raise PluginError(
                f"{where}: plugin '{plugin}' ({self.infos[plugin].kind}) has no {hook_name} hook; "
                f"plugins that can: {known or 'none'}"
            )
        key = (plugin, hook_name)
        if key not in self._callers:
            others = [p for n, p in self.pm.list_name_plugin() if n != plugin and p is not None]
            self._callers[key] = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        return self._callers[key]

    def add_web_routes(self, app: Any) -> None:
        """Let every plugin add its pages to the web application `cbm serve` runs
        (``cbm_web_routes``), after the application's own routes."""
        self.hook.cbm_web_routes(app=app)


def api_compatible(wanted: str, provided: str) -> bool:
    """A plugin written for API X.Y runs on a core X.Z with Z >= Y (same major version)."""
    try:
        w_major, w_minor = (int(p) for p in wanted.split(".")[:2])
        p_major, p_minor = (int(p) for p in provided.split(".")[:2])
    except ValueError:
        return False
    return w_major == p_major and w_minor <= p_minor


def plugin_kinds(hooks: list[str]) -> list[str]:
    """The families a plugin belongs to, read off the names of the hooks it implements."""
    kinds = {h.split("_")[1] for h in hooks if h.startswith("cbm_")}
    return [f for f in FAMILIES if f in kinds]


def registry_path() -> Path:
    """registry.toml: packaged inside cbm_core in a wheel, at the project root in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "registry.toml", here.parent / "registry.toml"):
        if candidate.is_file():
            return candidate
    raise PluginError("registry.toml of the built-in plugins is missing from this installation")


def builtin_plugins() -> list[dict[str, str]]:
    """The built-in plugins as catalogued in registry.toml."""
    return tomllib.loads(registry_path().read_text(encoding="utf-8"))["plugin"]


def load_plugins(entry_points: bool = True, builtins: bool = True) -> PluginManager:
    """Load the built-in plugins and (unless blocked) every installed `cbm` entry point."""
    manager = PluginManager()
    for name in filter(None, (n.strip() for n in os.environ.get(DISABLED_ENV, "").split(","))):
        manager.pm.set_blocked(name)
    version = _engine_version()
    if builtins:
        for entry in builtin_plugins():
            load = partial(importlib.import_module, entry["module"])
            _load(manager, entry["name"], load, "built-in", version, entry.get("description", ""))
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in manager.infos:
                manager.refused[f"{ep.name} ({ep.value})"] = f"name '{ep.name}' is taken by a built-in plugin"
                continue
            dist_version = ep.dist.version if ep.dist is not None else "unknown"
            loaded = _load(manager, ep.name, ep.load, "entry point", dist_version)
            if not loaded and not manager.pm.is_blocked(ep.name):  # the user installed it: say why it is off
                log.warning("plugin '%s' not loaded: %s", ep.name, manager.refused[ep.name])
    manager.pm.check_pending()
    if os.environ.get(TRACE_ENV, "").strip() not in ("", "0", "false", "no"):
        manager.pm.trace.root.setwriter(sys.stderr.write)
        manager.pm.enable_tracing()
    return manager


def _load(
    manager: PluginManager,
    name: str,
    load: Callable[[], ModuleType],
    origin: str,
    version: str,
    description: str = "",
) -> bool:
    """Import and register one plugin; a plugin that cannot load is refused, never fatal."""
    if manager.pm.is_blocked(name):
        manager.refused[name] = f"disabled by {DISABLED_ENV}"
        return False
    try:
        module = load()
    except ImportError as exc:  # typically an optional dependency (an extra) not installed
        manager.refused[name] = f"cannot import ({exc}); install the extra it needs, e.g. cbm-engine[all]"
        return False
    except Exception as exc:  # a broken third-party plugin must not take the engine down
        manager.refused[name] = f"failed to import: {type(exc).__name__}: {exc}"
        return False
    return manager.register(module, name, origin, version, description)


def _declared_options(module: ModuleType, name: str) -> frozenset[str] | None:
    options = getattr(module, OPTIONS_ATTRIBUTE, None)
    if options is None:
        return None
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
        raise PluginError(
            f"plugin '{name}' ({module.__name__}): {OPTIONS_ATTRIBUTE} must be a set of option names"
        )
    return frozenset(options)


def _new_pluggy() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _engine_version() -> str:
    try:
        return importlib.metadata.version("cbm-engine")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""
