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
    with tempfile.TemporaryDirectory(prefix="cbm-docs-") as tmp:
        for name, content in [*gallery(Path(tmp)), *notebook_page(Path(config.docs_dir), Path(tmp))]:
            files.append(File.generated(config, name, content=content))
    return files


# Gallery and notebook: real outputs of the demo, made when the site is built -------------------

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "demo" / "flanders.toml"
GALLERY_PARCEL = 4  # the demo parcel the gallery shows (a thin-cirrus 30 April after a clear 15th)


def gallery(tmp: Path) -> list[tuple[str, str | bytes]]:
    """gallery.md and its pictures, from a fresh run of the demo: parcel plot, peers, chip
    calendar, a report page (the PDF's A4 page), and a workbench screenshot (headless Chromium;
    left out, with a note, when Chromium is not installed)."""
    import io
    import shutil
    import subprocess

    import cbm_core as cbm
    from cbm_plugins import analyst
    from cbm_plugins.analyst import _report
    from cbm_plugins.workbench._export import export

    config = tmp / "flanders.toml"
    text = DEMO_CONFIG.read_text(encoding="utf-8").replace(
        '"flanders-2023/', f'"{DEMO_CONFIG.parent}/flanders-2023/'
    )
    config.write_text(text.replace('out = "out"', f'out = "{tmp / "out"}"'), encoding="utf-8")
    cbm.run(config, progress=False)
    done = analyst.open_run(config)
    pid = GALLERY_PARCEL

    def png(figure: Any, dpi: int = 80) -> bytes:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()

    pictures = {
        "parcel.png": png(analyst.plot_parcel(done, pid)),
        "peers.png": png(analyst.plot_peers(done, pid)),
        "calendar.png": png(analyst.calendar(done, pid, max_chips=12)),
        "report-page.png": png(_report._a4_page(_report._parcel_page(done, pid)), dpi=70),
    }
    items = [
        (
            "parcel.png",
            f"`cbm plot demo/flanders.toml {pid}`: Sentinel-2 NDVI with valid and rejected observations "
            "(the reason per group), rings on those a marker used, Sentinel-1 backscatter (dB), the verdict.",
        ),
        (
            "peers.png",
            f"`cbm plot demo/flanders.toml {pid} --peers`: against the parcels declared with the same crop.",
        ),
        (
            "calendar.png",
            f"`cbm chips demo/flanders.toml {pid} --out chips/`: calendar.png, the parcel centred in a "
            "128 px chip with a 50 m buffer, a scale bar, dates a marker used framed, event dates named.",
        ),
        (
            "report-page.png",
            f"`cbm report demo/flanders.toml {pid} --out report/`: the parcel's A4 page (PDF and "
            "printed HTML): declaration, verdict and reasons, location map, series, chips around each event.",
        ),
    ]
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:
        export(done, tmp / "workbench", chips="none")
        shot = tmp / "workbench.png"
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,860",
            "--virtual-time-budget=10000",
            f"--screenshot={shot}",
            f"--user-data-dir={tmp / 'profile'}",
        ]
        subprocess.run([browser, *flags, (tmp / "workbench" / "index.html").as_uri() + f"#pid={pid}"],
                       capture_output=True, timeout=120)  # fmt: skip
        if shot.is_file():
            pictures["workbench.png"] = shot.read_bytes()
            items.append(
                (
                    "workbench.png",
                    f"`cbm workbench export demo/flanders.toml wb/` opened from disk on "
                    f"`#pid={pid}`: parcels by light over Sentinel-2 false colour, the parcel's panel.",
                )
            )
    lines = [
        "# Gallery",
        "",
        "Real outputs of the bundled demo (`demo/flanders.toml`: 18 fields near Mol, April 2023), made",
        "when this site was built, so they show what the code does today.",
        "",
    ]
    for name, caption in items:
        lines += [f"![{name}](gallery/{name})", "", caption, ""]
    if "workbench.png" not in pictures:
        lines += ["!!! note", "    The workbench screenshot needs Chromium (`apt-get install chromium`).", ""]
    return [("gallery.md", "\n".join(lines)), *((f"gallery/{k}", v) for k, v in pictures.items())]


def notebook_page(docs: Path, tmp: Path) -> list[tuple[str, str | bytes]]:
    """notebooks/quickstart.ipynb executed and rendered as a page with its outputs (text, tables,
    figures), so the site shows what the notebook prints."""
    import base64

    import nbformat
    from nbclient import NotebookClient

    source = docs / "notebooks" / "quickstart.ipynb"
    notebook = nbformat.read(source, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(source.parent)}}
    ).execute()
    lines = ["<!-- rendered from notebooks/quickstart.ipynb when the site was built -->", ""]
    images: list[tuple[str, bytes]] = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            lines += [cell.source, ""]
            continue
        lines += ["```python", cell.source, "```", ""]
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                name = f"quickstart-{len(images) + 1}.png"
                images.append((f"notebooks/{name}", base64.b64decode(data["image/png"])))
                lines += [f"![output]({name})", ""]
            elif "text/html" in data:
                lines += ['<div class="nb-output" markdown="0">', data["text/html"], "</div>", ""]
            elif "text/plain" in data or output.get("text"):
                lines += ["```text", (output.get("text") or data["text/plain"]).rstrip(), "```", ""]
    lines += ["[Download the notebook](quickstart.ipynb)", ""]
    return [("notebooks/quickstart.md", "\n".join(lines)), *images]


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
