"""MkDocs hooks: reference pages generated from the code at build time, so they cannot go stale.

cli.md comes from the `cbm` click commands (with the commands plugins add), rest.md and
openapi.json from the OpenAPI schema of the REST app in cbm_plugins/serve/_app.py. Optional pages other
parts of the project write (markers, deployment, ...) join the navigation when they exist.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

# (file, title) appended to the navigation when the file exists in docs/.
OPTIONAL_PAGES = (
    ("markers.md", "Markers"),
    ("rest-api.md", "REST API guide"),
    ("postgis.md", "PostGIS"),
    ("deploy.md", "Deployment"),
    ("benchmarks.md", "Benchmarks"),
)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    docs = Path(config.docs_dir)
    known = {str(v) for item in config.nav for v in item.values()}
    for name, title in OPTIONAL_PAGES:
        if (docs / name).is_file() and name not in known:
            config.nav.append({title: name})
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    schema = openapi_schema()
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    files.append(File.generated(config, "rest.md", content=rest_reference(schema)))
    files.append(File.generated(config, "openapi.json", content=json.dumps(schema, indent=2)))
    return files


HOOK_TABLE = "<!-- hook-table -->"  # where plugins.md gets the table generated from hookspecs.py


def on_page_markdown(markdown: str, page: Any, config: MkDocsConfig, files: Files) -> str:
    return markdown.replace(HOOK_TABLE, hook_table()) if HOOK_TABLE in markdown else markdown


def hook_table() -> str:
    """Every hook of cbm_core/hookspecs.py: family, call signature, what it does, and its arguments."""
    import inspect

    from cbm_core import hookspecs

    lines = ["| family | hook | what it does | arguments |", "|---|---|---|---|"]
    for name in sorted(n for n in dir(hookspecs) if n.startswith("cbm_")):
        function = getattr(hookspecs, name)
        arguments = list(inspect.signature(function).parameters)
        explained = "<br>".join(f"`{a}`: {hookspecs.ARGUMENTS[a]}" for a in arguments)
        first = "first result" if function.cbm_spec.get("firstresult") else "every plugin"
        doc = " ".join(function.__doc__.split())
        lines.append(
            f"| {name.split('_')[1]} | `{name}({', '.join(arguments)})` | {doc} ({first}) | {explained} |"
        )
    return "\n".join(lines)


def cli_reference() -> str:
    """Every `cbm` command's --help, plugin commands included (as `cbm` itself loads them)."""
    from cbm_core.cli import cli

    cli.list_commands(click.Context(cli))  # the plugins add their commands on first lookup
    lines = [
        "# CLI reference",
        "",
        "Generated from `cbm --help` and each command's help when the documentation is built.",
        "",
    ]
    for path, command in _walk(cli, ["cbm"]):
        with click.Context(command, info_name=" ".join(path)) as ctx:
            text = command.get_help(ctx)
        lines += [f"## `{' '.join(path)}`", "", "```text", text, "```", ""]
    return "\n".join(lines)


def _walk(command: click.Command, path: list[str]):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _walk(command.commands[name], [*path, name])


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI schema of the REST app, built on an empty server configuration."""
    from cbm_plugins.serve import LIMIT_DEFAULTS, ServerConfig, create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = ServerConfig(
            root / "server.toml", root / "users.json", [], dict(LIMIT_DEFAULTS), root / "chips"
        )
        return create_app(config).openapi()


def rest_reference(schema: dict[str, Any]) -> str:
    """The endpoints of the OpenAPI schema as Markdown: parameters, body and responses."""
    info = schema.get("info", {})
    lines = [
        "# REST reference",
        "",
        f"**{info.get('title', 'API')}** version {info.get('version', '?')}. {info.get('description', '')}",
        "",
        "Generated from the OpenAPI schema of `cbm serve` (cbm_plugins/serve/_routes_*.py) when the docs",
        "is built; the complete schema is [openapi.json](openapi.json).",
        "",
    ]
    for route, methods in sorted(schema.get("paths", {}).items()):
        for method, operation in methods.items():
            lines += [f"## `{method.upper()} {route}`", ""]
            summary = operation.get("summary", "")
            description = operation.get("description", "")
            lines += [summary, "", description, ""] if description else [summary, ""]
            parameters = operation.get("parameters", [])
            if parameters:
                lines += ["| parameter | in | required | type | description |", "|---|---|---|---|---|"]
                for p in parameters:
                    kind = _type(p.get("schema", {}))
                    text = _cell(p.get("description", "") or p.get("schema", {}).get("description", ""))
                    required = "yes" if p.get("required") else "no"
                    lines.append(f"| `{p['name']}` | {p['in']} | {required} | {kind} | {text} |")
                lines.append("")
            body = operation.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                lines += [f"Request body ({media}): {_type(content.get('schema', {}))}", ""]
            responses = operation.get("responses", {})
            if responses:
                lines.append(
                    "Responses: "
                    + ", ".join(f"{code} {_cell(r.get('description', ''))}" for code, r in responses.items())
                )
                lines.append("")
    return "\n".join(lines)


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type(s) for s in schema[key])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    return str(schema.get("type", "any"))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
