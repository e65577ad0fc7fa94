"""Sentinel-2 L2A SAFE products built to the ESA product specification from the demo's real pixels.

The demo (demo/flanders-2023) holds harmonised L2A reflectances (the -1000 offset already removed)
cut to a 640 m window of tile T31UFS. A product here is that window packaged as the real thing:
``<name>.SAFE/MTD_MSIL2A.xml``, ``GRANULE/<granule>/MTD_TL.xml`` and JPEG2000 bands (lossless,
tiled) under ``IMG_DATA/R10m|R20m|R60m`` named ``T31UFS_<sensing>_<band>_<res>m.jp2``, with the
field names of the ESA L2A metadata (PSD 14.9). A baseline >= 04.00 product stores DN + 1000 and
declares BOA_ADD_OFFSET -1000 per band, so its physical reflectances equal the demo's; an older
baseline stores the demo DNs and has no offset list. Only the window is stored (the tile's
Geoposition and Size describe it), so the fixture stays a few hundred kB.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import rasterio

TILE = "31UFS"
BOA_OFFSET = 1000
BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
NATIVE = {"B01": 60, "B04": 10, "B08": 10, "B11": 20, "SCL": 20, "AOT": 10}
JP2_BLOCK = 32  # tile size of the fixture's JPEG2000 code-stream (real products: 1024 at 10 m)


def product_name(scene_dir: Path, baseline: str, time: str = "104621") -> str:
    """S2A_MSIL2A_20230402T104621_N0509_R008_T31UFS_20230402T130000 for a demo scene folder."""
    unit, date = scene_dir.name[2], scene_dir.name.split("_")[2]
    return f"S2{unit}_MSIL2A_{date}T{time}_N{baseline}_R008_T{TILE}_{date}T130000"


def write_jp2(path: Path, array: np.ndarray, profile: dict, block: int = JP2_BLOCK) -> None:
    """A lossless, tiled JPEG2000 file (GDAL JP2OpenJPEG), as the ground segment writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(driver="JP2OpenJPEG", width=array.shape[1], height=array.shape[0], count=1,
                   dtype=array.dtype, crs=profile["crs"], transform=profile["transform"],
                   QUALITY=100, REVERSIBLE="YES", BLOCKXSIZE=block, BLOCKYSIZE=block)  # fmt: skip
    with rasterio.open(path, "w", **options) as out:
        out.write(array, 1)


def build_product(
    scene_dir: Path,
    out_dir: Path,
    baseline: str = "0509",
    eodata: bool = True,
    omit: tuple[str, ...] = (),
    corrupt: tuple[str, ...] = (),
    offsets: bool | None = None,
) -> Path:
    """One SAFE folder from a demo scene folder; returns the .SAFE path.

    eodata: place it under Sentinel-2/MSI/L2A/YYYY/MM/DD/ (CDSE layout), else directly in out_dir.
    omit: bands listed in the metadata whose file is left out; corrupt: bands whose JP2 is cut short.
    offsets: write BOA_ADD_OFFSET (default: baseline >= 04.00).
    """
    with_offset = int(baseline[:2]) >= 4 if offsets is None else offsets
    name = product_name(scene_dir, baseline)
    date = name.split("_")[2][:8]
    sensing = f"{date[:4]}-{date[4:6]}-{date[6:]}T10:46:21.024Z"
    folder = out_dir / (f"Sentinel-2/MSI/L2A/{date[:4]}/{date[4:6]}/{date[6:]}" if eodata else "")
    safe = folder / f"{name}.SAFE"
    if safe.exists():
        shutil.rmtree(safe)
    granule = f"L2A_T{TILE}_A040000_{date}T104621"
    stamp = f"T{TILE}_{date}T104621"
    images, geo = [], {}
    for band, resolution in NATIVE.items():
        with rasterio.open(scene_dir / f"{band}.tif") as src:
            array, profile = src.read(1), src.profile
        if band not in ("SCL", "AOT") and with_offset:
            array = np.where(array == 0, 0, array.astype(np.uint32) + BOA_OFFSET).astype(np.uint16)
        versions = [(resolution, array, profile["transform"])]
        if band == "B04":  # real products also carry the 10 m bands resampled to 20 m
            versions.append(
                (20, array[::2, ::2].copy(), profile["transform"] @ profile["transform"].scale(2))
            )
        for res, data, transform in versions:
            relative = f"GRANULE/{granule}/IMG_DATA/R{res}m/{stamp}_{band}_{res}m"
            images.append(relative)
            geo.setdefault(res, (transform, data.shape))
            if band in omit and res == resolution:
                continue
            path = safe / f"{relative}.jp2"
            write_jp2(path, data, {"crs": profile["crs"], "transform": transform})
            if band in corrupt and res == resolution:
                content = path.read_bytes()
                path.write_bytes(content[: len(content) // 3])
    (safe / "MTD_MSIL2A.xml").write_text(_product_xml(name, sensing, baseline, images, with_offset))
    (safe / f"GRANULE/{granule}/MTD_TL.xml").write_text(_tile_xml(sensing, baseline, geo))
    return safe


def zip_product(safe: Path, out_dir: Path) -> Path:
    """The product as CDSE's download zip: <name>.SAFE.zip holding the <name>.SAFE folder."""
    target = out_dir / f"{safe.name}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(safe.rglob("*")):
            if path.is_file():
                archive.write(path, f"{safe.name}/{path.relative_to(safe)}")
    return target


def _product_xml(name: str, sensing: str, baseline: str, images: list[str], with_offset: bool) -> str:
    files = "\n".join(f"            <IMAGE_FILE>{i}</IMAGE_FILE>" for i in images)
    spectral = "\n".join(
        f'        <Spectral_Information bandId="{i}" physicalBand="B{b[1:].lstrip("0")}">'
        f"<RESOLUTION>{NATIVE.get(b, 20)}</RESOLUTION></Spectral_Information>"
        for i, b in enumerate(BAND_IDS)
    )
    offsets = "\n".join(
        f'        <BOA_ADD_OFFSET band_id="{i}">-{BOA_OFFSET}</BOA_ADD_OFFSET>' for i in range(13)
    )
    day, version = sensing[:10].replace("-", ""), f"N{baseline[:2]}.{baseline[2:]}"
    datatake = f"GS2{name[2]}_{day}T104621_040000_{version}"
    granule = f"S2{name[2]}_OPER_MSI_L2A_TL_2APS_{day}T130000_A040000_T{TILE}_{version}"
    offset_list = f"      <BOA_ADD_OFFSET_VALUES_LIST>\n{offsets}\n      </BOA_ADD_OFFSET_VALUES_LIST>"
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <n1:General_Info>
    <Product_Info>
      <PRODUCT_START_TIME>{sensing}</PRODUCT_START_TIME>
      <PRODUCT_STOP_TIME>{sensing}</PRODUCT_STOP_TIME>
      <PRODUCT_URI>{name}.SAFE</PRODUCT_URI>
      <PROCESSING_LEVEL>Level-2A</PROCESSING_LEVEL>
      <PRODUCT_TYPE>S2MSI2A</PRODUCT_TYPE>
      <PROCESSING_BASELINE>{baseline[:2]}.{baseline[2:]}</PROCESSING_BASELINE>
      <Datatake datatakeIdentifier="{datatake}">
        <SPACECRAFT_NAME>Sentinel-2{name[2]}</SPACECRAFT_NAME>
        <DATATAKE_TYPE>INS-NOBS</DATATAKE_TYPE>
        <DATATAKE_SENSING_START>{sensing}</DATATAKE_SENSING_START>
        <SENSING_ORBIT_NUMBER>8</SENSING_ORBIT_NUMBER>
        <SENSING_ORBIT_DIRECTION>DESCENDING</SENSING_ORBIT_DIRECTION>
      </Datatake>
      <Product_Organisation>
        <Granule_List>
          <Granule granuleIdentifier="{granule}" imageFormat="JPEG2000">
{files}
          </Granule>
        </Granule_List>
      </Product_Organisation>
    </Product_Info>
    <Product_Image_Characteristics>
      <Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX></Special_Values>
      <Special_Values><SPECIAL_VALUE_TEXT>SATURATED</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>65535</SPECIAL_VALUE_INDEX></Special_Values>
      <QUANTIFICATION_VALUES_LIST>
        <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>
        <AOT_QUANTIFICATION_VALUE unit="none">1000.0</AOT_QUANTIFICATION_VALUE>
        <WVP_QUANTIFICATION_VALUE unit="cm">1000.0</WVP_QUANTIFICATION_VALUE>
      </QUANTIFICATION_VALUES_LIST>
{offset_list if with_offset else ""}
      <Spectral_Information_List>
{spectral}
      </Spectral_Information_List>
    </Product_Image_Characteristics>
  </n1:General_Info>
  <n1:Quality_Indicators_Info>
    <Cloud_Coverage_Assessment>12.5</Cloud_Coverage_Assessment>
  </n1:Quality_Indicators_Info>
</n1:Level-2A_User_Product>
"""


def _tile_xml(sensing: str, baseline: str, geo: dict) -> str:
    parts = []
    for res in sorted(geo):
        transform, (rows, cols) = geo[res]
        parts.append(
            f'      <Size resolution="{res}"><NROWS>{rows}</NROWS><NCOLS>{cols}</NCOLS></Size>\n'
            f'      <Geoposition resolution="{res}"><ULX>{transform.c:.0f}</ULX><ULY>{transform.f:.0f}</ULY>'
            f"<XDIM>{transform.a:.0f}</XDIM><YDIM>{transform.e:.0f}</YDIM></Geoposition>"
        )
    geocoding = "\n".join(parts)
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_Tile_ID xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd">
  <n1:General_Info>
    <TILE_ID metadataLevel="Brief">S2A_OPER_MSI_L2A_TL_2APS_T{TILE}_N{baseline[:2]}.{baseline[2:]}</TILE_ID>
    <SENSING_TIME metadataLevel="Standard">{sensing}</SENSING_TIME>
  </n1:General_Info>
  <n1:Geometric_Info>
    <Tile_Geocoding metadataLevel="Brief">
      <HORIZONTAL_CS_NAME>WGS84 / UTM zone 31N</HORIZONTAL_CS_NAME>
      <HORIZONTAL_CS_CODE>EPSG:32631</HORIZONTAL_CS_CODE>
{geocoding}
    </Tile_Geocoding>
  </n1:Geometric_Info>
</n1:Level-2A_Tile_ID>
"""
