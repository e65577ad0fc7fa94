"""The FastAPI application: the datasets and users on app.state, size limits, error handlers and the
routers (one module per group of routes)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from fastapi import FastAPI

from cbm_core import logs
from cbm_core.plugins import PluginManager, load_plugins
from cbm_plugins.serve import (
    _routes_chips,
    _routes_context,
    _routes_info,
    _routes_parcels,
    _routes_results,
    _routes_series,
)
from cbm_plugins.serve._config import (
    CONFIG_ENV,
    ServerConfig,
    apply_store_timeout,
    check_plugins,
    load_server_config,
)
from cbm_plugins.serve._datasets import Datasets
from cbm_plugins.serve._files import Files
from cbm_plugins.serve._http import SizeLimit, install_error_handlers
from cbm_plugins.serve._logging import AccessLog
from cbm_plugins.serve._throttle import HashPool, LoginThrottle
from cbm_plugins.serve._users import Authenticator

ROUTERS = (
    _routes_info.router,
    _routes_parcels.router,
    _routes_series.router,
    _routes_chips.router,
    _routes_context.router,
    _routes_results.router,
)


def create_app(config: ServerConfig, plugins: PluginManager | None = None) -> FastAPI:
    """The FastAPI application serving the datasets of a server configuration."""
    manager = plugins if plugins is not None else load_plugins()
    check_plugins(config, manager)
    apply_store_timeout(config, manager)
    config.chip_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(
        title="cbm-engine CbM RESTful API",
        version="1.0",
        description="JRC CbM-compatible queries (column-oriented JSON) plus marker results and verdicts.",
    )
    files = Files(config.chip_dir, config.signing_key)
    app.state.datasets = Datasets(config.datasets, manager, config.limits, files)
    app.state.authenticator = Authenticator(config.users)
    app.state.login_throttle = LoginThrottle(int(config.limits["login_free_failures"]))
    app.state.login_checks = {}  # credentials digest -> the scrypt check in flight
    app.state.hash_pool = HashPool(
        int(config.limits["login_hash_threads"]), int(config.limits["login_hash_queue"])
    )
    app.add_middleware(
        SizeLimit,
        max_body=int(config.limits["max_body_bytes"]),
        max_query=int(config.limits["max_query_bytes"]),
    )
    app.add_middleware(AccessLog)  # outermost of ours: requests refused for their size are logged too
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    manager.add_web_routes(app)  # plugin pages (the workbench) with the same users and aoi rights

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory (one per worker process): the configuration path comes from CBM_SERVER_CONFIG.

    The objects made so far (modules, the app) live as long as the worker: gc.freeze() takes them
    out of the garbage collector's full passes, which otherwise scan them all and stall every
    request in flight for 50-250 ms now and then.
    """
    logs.configure()  # a worker process: level and format from CBM_LOG_LEVEL / CBM_LOG_FORMAT
    app = create_app(load_server_config(Path(os.environ[CONFIG_ENV])))
    gc.collect()
    gc.freeze()
    return app
