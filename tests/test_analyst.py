"""Analyst front doors on a real run of the demo: plots, chips, reports, and what they say when
data is missing (a parcel outside the imagery, a cloudy-only season, a period without scenes)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from matplotlib.figure import Figure
from matplotlib.image import imread

import cbm_core as cbm
from cbm_core.cli import cli
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import BandRef
from cbm_plugins import analyst
from cbm_plugins.analyst._plots import data_notes, observations, open_run
from cbm_plugins.analyst._report import flagged_pids
from tests.conftest import DEMO, write_config

OUTSIDE = 99  # a parcel 5 km east of the imagery: no observations, no chips


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo (S2 + S1) run once, with one extra parcel outside every scene."""
    folder = tmp_path_factory.mktemp("analyst")
    parcels = gpd.read_file(DEMO / "parcels.gpkg", layer="parcels")
    far = shapely.box(649000, 5676000, 649100, 5676100)
    extra = gpd.GeoDataFrame({"pid": [OUTSIDE], "crop_name": ["grass"]}, geometry=[far], crs=parcels.crs)
    pd.concat([parcels, extra], ignore_index=True).to_file(folder / "parcels.gpkg", layer="parcels")
    config = write_config(
        folder,
        f"""
[source]
plugin = "local"
parcels = "{folder / "parcels.gpkg"}"
crop_name_column = "crop_name"
scenes = "{DEMO / "scenes.csv"}"

[[extract]]
card = "s2"
plugin = "zonal"
bands = ["B04", "B08", "B11", "SCL"]

[[extract]]
card = "bs"
plugin = "zonal"
bands = ["VV", "VH"]
""",
    )
    cbm.run(config, progress=False)
    return config


@pytest.fixture(scope="module")
def cloudy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that only has the two fully clouded Sentinel-2 dates."""
    folder = tmp_path_factory.mktemp("cloudy")
    scenes = pd.read_csv(DEMO / "scenes.csv", dtype=str)
    keep = scenes["product_id"].isin(["S2A_MSIL2A_20230402_T31UFS", "S2B_MSIL2A_20230407_T31UFS"])
    scenes = scenes[keep].assign(path=lambda f: [str(DEMO / p) for p in f["path"]])
    scenes.to_csv(folder / "scenes.csv", index=False)
    config = write_config(
        folder,
        f"""
[source]
plugin = "local"
parcels = "{DEMO / "parcels.gpkg"}"
scenes = "{folder / "scenes.csv"}"
""",
    )
    cbm.run(config, progress=False)
    return config


def texts(fig: Figure) -> str:
    """Every text drawn on a figure (titles, annotations, messages, legends)."""
    found = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return "\n".join(found)


def test_parcel_plot_shows_valid_rejected_with_reasons_used_per_marker_and_verdict(demo_run: Path) -> None:
    done = open_run(demo_run)
    fig = analyst.plot_parcel(done, 4)
    words = texts(fig)
    # April 2023 has two valid dates here: the honest verdict is "not enough evidence", not green
    assert "verdict YELLOW" in words and "2 valid Sentinel-2 observation(s)" in words and "3 needed" in words
    s2_axis, s1_axis = fig.axes
    lines = {line.get_label(): line for line in s2_axis.get_lines()}
    days = {label: [pd.Timestamp(d).day for d in line.get_xdata()] for label, line in lines.items()}
    assert days["valid (2)"] == [5, 15]
    assert days["rejected: SCL thin cirrus (1)"] == [30]  # the scene ndvi_drop used to count as clear
    assert len(days["rejected: SCL cloud (9)"]) == 9
    assert days["used by ndvi_drop (2)"] == [5, 15]  # exactly the valid ones
    assert {"VV", "VH"} <= {line.get_label() for line in s1_axis.get_lines()}


def test_backscatter_is_converted_to_db_after_averaging_linear(demo_run: Path) -> None:
    done = open_run(demo_run)
    series = done.series([4])
    bs = observations(series, 4)["bs"]
    stored = series.stats[(series.stats["band"] == "VV")].set_index("obsid")["mean"]
    expected = 10 * np.log10(stored.loc[bs["obsid"]].to_numpy())
    np.testing.assert_allclose(bs["VV_dB"].to_numpy(), expected)
    assert bs["VV_dB"].between(-25, 5).all()


def test_peers_plot_compares_with_same_declared_crop(demo_run: Path) -> None:
    words = texts(analyst.plot_peers(demo_run, 4))
    assert "17 peers declared unknown" in words  # the far parcel is declared grass, not a peer
    assert "peers median" in words


def test_parcel_without_observations_says_so_in_place(demo_run: Path) -> None:
    done = open_run(demo_run)
    words = texts(analyst.plot_parcel(done, OUTSIDE))
    assert "no Sentinel-2 NDVI observations of this parcel" in words
    assert "no Sentinel-1 backscatter (dB) observations of this parcel" in words
    assert data_notes(observations(done.series([OUTSIDE]), OUTSIDE), done.cards) == [
        "No observations of this parcel in the signature store."
    ]
    assert "no observations of this parcel or its peers" in texts(analyst.plot_peers(done, OUTSIDE))


def test_parcel_without_clear_observation_says_so(cloudy_run: Path) -> None:
    words = texts(analyst.plot_parcel(cloudy_run, 7))
    assert "no valid observation: the validity policy rejects all 2" in words
    done = open_run(cloudy_run)
    notes = data_notes(observations(done.series([7]), 7, done.policy), done.cards)
    assert notes == ["No valid Sentinel-2 observation: the validity policy rejects all 2."]


def test_unknown_parcel_is_an_input_error(demo_run: Path) -> None:
    with pytest.raises(InputError, match="parcel 12345 is not among the 19 parcels"):
        analyst.plot_parcel(demo_run, 12345)


def test_chips_write_geotiffs_pngs_and_calendar(demo_run: Path, tmp_path: Path) -> None:
    written = analyst.write_chips(demo_run, 7, tmp_path, "2023-04-05", "2023-04-15")
    tifs = sorted(p.name for p in written if p.suffix == ".tif")
    assert tifs[0] == "20230405_S2A_MSIL2A_20230405_T31UFS.tif" and len(tifs) == 5
    assert (tmp_path / "calendar.png").stat().st_size > 10_000
    with rasterio.open(tmp_path / tifs[0]) as tif:
        assert tif.count == 3 and tif.crs.to_epsg() == 32631 and tif.res == (10.0, 10.0)
        assert tif.descriptions == ("B11", "B08", "B04")
        data = tif.read()
        parcel = open_run(demo_run).parcel(7).geometry
        assert shapely.box(*tif.bounds).contains(parcel)
    assert np.nanmin(data) > 0 and np.nanmax(data) < 1  # reflectance, not digital numbers
    ndvi = analyst.read_chips(demo_run, 7, "2023-04-15", "2023-04-15", kind="ndvi")
    assert len(ndvi) == 1 and 0.5 < float(np.nanmedian(ndvi[0].image)) < 1.0


def test_a_period_without_imagery_says_so(demo_run: Path) -> None:
    assert analyst.read_chips(demo_run, 7, "2023-06-01", "2023-06-30") == []
    words = texts(analyst.calendar(demo_run, 7, "2023-06-01", "2023-06-30"))
    assert "no Sentinel-2 imagery of this parcel in this period" in words
    assert analyst.read_chips(demo_run, OUTSIDE) == []  # no scene footprint touches it


def test_an_unreadable_date_keeps_its_place_with_the_reason(demo_run: Path) -> None:
    done = open_run(demo_run)
    catalogue = done.catalogue.copy()
    first = catalogue.index[catalogue["obsid"] == "S2A_MSIL2A_20230405_T31UFS"][0]
    catalogue.at[first, "bands"] = {**catalogue.at[first, "bands"], "B11": BandRef("/nonexistent/B11.tif")}
    broken = dataclasses.replace(done, catalogue=catalogue)
    found = analyst.read_chips(broken, 7, "2023-04-05", "2023-04-15")
    assert found[0].data is None and found[0].message.startswith("no imagery: /nonexistent/B11.tif")
    assert all(c.data is not None for c in found[1:])
    assert "no imagery: /nonexistent/B11.tif" in " ".join(
        texts(analyst.calendar(broken, 7, found=found)).split()
    )


def pdf_pages(path: Path) -> list[tuple[float, float]]:
    """(width, height) in points of every page of a PDF (read from its page objects)."""
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    boxes = re.findall(
        rb"/Type /Page\b.*?/MediaBox \[ *([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) *\]", data, re.S
    )
    boxes += re.findall(
        rb"/MediaBox \[ *([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) *\][^>]*?/Type /Page\b", data, re.S
    )
    pages = len(re.findall(rb"/Type\s*/Page\b(?!s)", data))
    sizes = [(float(c) - float(a), float(d) - float(b)) for a, b, c, d in boxes]
    assert len(sizes) >= pages, "a page without MediaBox"
    return sizes[:pages]


A4_POINTS = (595.3, 841.9)


def test_report_summary_then_one_a4_page_per_parcel_in_headless_chromium(
    demo_run: Path, tmp_path: Path
) -> None:
    html_path, pdf_path = analyst.write_report(demo_run, [4, OUTSIDE, 7], tmp_path)
    page = html_path.read_text()
    assert page.count('<section class="page parcel"') == 3 and "YELLOW" in page
    assert page.count("data:image/png;base64,") == 9 and '<img src="http' not in page  # self-contained
    assert '<nav class="toc">' in page and page.count('href="#parcel-') == 3  # table of contents
    assert "@media print" in page and "size: A4" in page
    assert "No observations of this parcel in the signature store." in page
    assert "No Sentinel-2 imagery of this parcel in the run&#39;s period." in page  # autoescaped
    assert "parcels in the run:" in page and "ndvi_drop" in page
    sizes = pdf_pages(pdf_path)
    assert len(sizes) == 1 + 3, "a summary page, then one page per parcel"
    for width, height in sizes:
        assert width == pytest.approx(A4_POINTS[0], abs=2) and height == pytest.approx(A4_POINTS[1], abs=2)
    pixels = screenshot(html_path, tmp_path / "shot.png")
    assert pixels.std() > 0.1, "the screenshot is blank"
    ink = (pixels.mean(axis=2) < 0.9).mean()
    assert ink > 0.05, f"only {ink:.1%} of the screenshot is not white"
    printed = print_to_pdf(html_path, tmp_path / "printed.pdf")  # the browser's print stylesheet
    assert len(printed) == 1 + 3
    assert all(
        w == pytest.approx(A4_POINTS[0], abs=2) and h == pytest.approx(A4_POINTS[1], abs=2)
        for w, h in printed
    )


def test_report_of_a_run_without_flagged_parcel_says_so(demo_run: Path, tmp_path: Path) -> None:
    html_path, pdf_path = analyst.write_report(demo_run, [], tmp_path, name="flagged")
    assert "No red or yellow parcel in this report" in html_path.read_text()
    assert len(pdf_pages(pdf_path)) == 1


def test_report_templates_can_be_overridden_and_unknown_keys_are_refused(
    demo_run: Path, tmp_path: Path
) -> None:
    own = tmp_path / "brand"
    own.mkdir()
    (own / "report.html.j2").write_text(
        '{% extends "base.html.j2" %}'
        if False
        else "<h1>Rapport {{ parcels|length }}</h1>{{ run }}<i>{{ '<b>' }}</i>"
    )
    text = Path(demo_run).read_text()
    branded = Path(demo_run).with_name("branded.toml")
    branded.write_text(text + f'\n[analyst]\ntemplates = "{own}"\n')
    html_path, _ = analyst.write_report(branded, [4], tmp_path)
    assert html_path.read_text().startswith("<h1>Rapport 1</h1>") and "&lt;b&gt;" in html_path.read_text()
    wrong = Path(demo_run).with_name("wrong.toml")
    wrong.write_text(text + '\n[analyst]\ntemplate = "x"\n')
    with pytest.raises(ConfigError, match=r"\[analyst\]: unknown key 'template' \(did you mean 'templates'"):
        analyst.write_report(wrong, [4], tmp_path)


def test_location_map_says_when_the_orthophoto_service_is_missing(demo_run: Path, tmp_path: Path) -> None:
    from cbm_plugins.analyst._report import _location_map

    text = Path(demo_run).read_text()
    config = Path(demo_run).with_name("ortho.toml")
    config.write_text(text + '\n[analyst]\northophoto = "/vsicurl/http://127.0.0.1:9/ortho.tif"\n')
    words = texts(_location_map(open_run(config), 4))
    assert "orthophoto /vsicurl/http://127.0.0.1:9/ortho.tif not available" in words
    assert "background: Sentinel-2" in texts(_location_map(open_run(demo_run), 4))


def test_cli_plot_chips_report(demo_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["plot", str(demo_run), "4", "--out", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    assert imread(tmp_path / "p.png").shape[1] > 800
    out = runner.invoke(
        cli,
        ["chips", str(demo_run), "4", "--start", "2023-04-15", "--end", "2023-04-16", "--out", str(tmp_path)],
    )
    assert out.exit_code == 0 and "1 chip(s)" in out.output
    out = runner.invoke(cli, ["report", str(demo_run), "--out", str(tmp_path)])
    assert out.exit_code != 0 and "give parcel ids or --flagged" in out.output
    out = runner.invoke(cli, ["report", str(demo_run), "1", "--out", str(tmp_path)])
    assert out.exit_code == 0 and (tmp_path / "parcel-1.pdf").is_file()
    # every parcel is yellow on April 2023 (two valid dates at most): every one is to be looked at
    assert set(flagged_pids(demo_run)) == set(open_run(demo_run).parcels["pid"])


def chromium_flags(profile: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


def print_to_pdf(page: Path, target: Path) -> list[tuple[float, float]]:
    """Print a page with headless Chromium (its print stylesheet) and return the PDF's page sizes."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail(
            "chromium is not installed: apt-get install chromium chromium-driver (scripts/test.sh does)"
        )
    with tempfile.TemporaryDirectory() as profile:
        flags = [*chromium_flags(profile), f"--print-to-pdf={target}", "--no-pdf-header-footer"]
        done = subprocess.run([browser, *flags, page.resolve().as_uri()], capture_output=True, timeout=120)
    assert target.is_file(), f"chromium wrote no PDF: {done.stderr.decode()[-500:]}"
    return pdf_pages(target)


def screenshot(page: Path, target: Path) -> np.ndarray:
    """Render a page in headless Chromium and return the screenshot's pixels (0..1)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail(
            "chromium is not installed: apt-get install chromium chromium-driver (scripts/test.sh does)"
        )
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={target}",
            "--window-size=1200,1600",
        ]
        done = subprocess.run([browser, *flags, page.resolve().as_uri()], capture_output=True, timeout=90)
    assert target.is_file(), f"chromium wrote no screenshot: {done.stderr.decode()[-500:]}"
    return imread(target)[..., :3]


def test_chips_centre_the_parcel_with_a_buffer_scale_bar_and_colour_bar(
    demo_run: Path, tmp_path: Path
) -> None:
    done = open_run(demo_run)
    (chip,) = analyst.read_chips(done, 7, "2023-04-15", "2023-04-15", kind="ndvi", buffer=40)
    x0, y0, x1, y1 = done.parcel(7).geometry.bounds
    left, bottom, right, top = chip.bounds
    assert right - left == pytest.approx(top - bottom)  # square
    assert (left + right) / 2 == pytest.approx((x0 + x1) / 2) and (bottom + top) / 2 == pytest.approx(
        (y0 + y1) / 2
    )
    assert right - left == pytest.approx(max(x1 - x0, y1 - y0) + 80)  # 40 m each side of the longer side
    assert chip.display(200).shape == (200, 200)
    assert analyst.read_chips(done, 7, "2023-04-15", "2023-04-15")[0].display().shape == (128, 128, 3)
    fig = analyst.calendar(done, 7, "2023-04-15", "2023-04-15", kind="ndvi", found=[chip])
    words = texts(fig)
    assert " m" in words and "NDVI" in [ax.get_ylabel() for ax in fig.axes]  # scale bar, colour bar
    written = analyst.write_chips(done, 7, tmp_path, "2023-04-15", "2023-04-15", kind="ndvi", size=64)
    assert {p.suffix for p in written} == {".tif", ".png"}
    with pytest.raises(InputError, match="chip size 8"):
        analyst.write_chips(done, 7, tmp_path, size=8)
    with pytest.raises(InputError, match="chip buffer -1"):
        analyst.read_chips(done, 7, buffer=-1)


def test_scale_bar_lengths_are_round() -> None:
    from cbm_plugins.analyst._chips import nice_length

    assert [nice_length(x) for x in (0.5, 7, 38, 120, 999, 2600)] == [1, 5, 20, 100, 500, 2000]


def test_calendar_ranks_by_valid_share_keeps_used_and_marks_events(demo_run: Path) -> None:
    done = open_run(demo_run)
    found = analyst.read_chips(done, 4)
    cirrus = next(c for c in found if f"{c.date:%m-%d}" == "04-30")
    # the plot, the calendar and the marker agree: thin cirrus is rejected, and nobody used it
    assert cirrus.valid is False and cirrus.why == "SCL thin cirrus 100% > 5%" and not cirrus.used
    assert "rejected: SCL thin cirrus" in cirrus.label
    assert [f"{c.date:%m-%d}" for c in found if c.used] == ["04-05", "04-15"]
    assert all(c.valid for c in found if c.used)
    from cbm_plugins.analyst._chips import rank_chips

    shown = rank_chips(found, 4)
    dates = [f"{c.date:%m-%d}" for c in shown]
    assert {"04-05", "04-15"} <= set(dates)  # the used ones first
    assert [c.date for c in shown] == sorted(c.date for c in shown)
    words = texts(analyst.calendar(done, 4, found=found, max_chips=4))
    assert "used" in words and "4 of 12 scenes" in words


def test_parcel_plot_shows_weather_under_the_ndvi(demo_run: Path, tmp_path: Path) -> None:
    """[analyst] meteo: a precipitation/temperature panel right under the NDVI. The demo season has
    no AgERA5 extract, so the test places the real 2018 West-Flanders days (tests/data/flanders-meteo)
    on the demo's April 2023 dates at the demo's cell."""
    real = pd.read_csv(Path(__file__).parent / "data" / "flanders-meteo" / "agera5-2018.csv")
    april = real[real["date"].str.startswith("2018-04")].assign(
        lon=5.05, lat=51.2, date=lambda f: f["date"].str.replace("2018", "2023")
    )
    april.to_csv(tmp_path / "meteo.csv", index=False)
    config = demo_run.with_name("run-meteo.toml")
    config.write_text(
        demo_run.read_text()
        + f'\n[analyst]\nmeteo = {{ plugin = "meteo", path = "{tmp_path / "meteo.csv"}" }}\n'
    )
    fig = analyst.plot_parcel(config, 4)
    _, rain_axis, _, heat_axis = fig.axes  # NDVI, rain, backscatter, then the temperature twin axis
    assert rain_axis.get_title(loc="left").startswith("Daily precipitation")
    first, last = open_run(config).period()  # the run's scenes: 2 to 30 April
    shown = april[(april["date"] >= f"{first:%Y-%m-%d}") & (april["date"] <= f"{last:%Y-%m-%d}")]
    bars = [patch.get_height() for patch in rain_axis.patches]
    np.testing.assert_allclose(sorted(bars), sorted(shown["prec"]))
    assert len(heat_axis.get_lines()[0].get_xdata()) == len(shown) < len(april)
    far = texts(analyst.plot_parcel(config, OUTSIDE))
    assert "Daily precipitation" not in far  # outside the meteo cell: no panel, never a neighbour's
