"""How this folder was made (run once by hand; the tests never read ../shared).

From the flanders-seasons package (see README.md here): the 14 parcels of sample 00002806639B424A
(season 2018, West Flanders) and that sample's AgERA5 daily meteo for 2018, as a CSV with the
cell centre and as a small CF netCDF grid (0.1 degree cells, the data in the cell holding the
patch, the three neighbours empty) written with scipy (netCDF3 classic, read back through GDAL).
"""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from scipy.io import netcdf_file

SHARED = Path(sys.argv[1] if len(sys.argv) > 1 else "../../../../shared/data/flanders-seasons")
HERE = Path(__file__).parent
SAMPLE = "00002806639B424A"
CELL = (3.0, 50.8)  # AgERA5 cell centre (0.1 degree grid) holding the patch at 3.0238 E 50.8160 N
VARIABLES = {"tmin": "tmin_c", "tmean": "tmean_c", "tmax": "tmax_c", "prec": "precipitation_mm"}

parcels = gpd.read_file(SHARED / "parcels.gpkg")
parcels = parcels[parcels["sample"] == SAMPLE]
parcels = parcels.assign(parcel_code=[f"BE18-{SAMPLE[-6:]}-{p:03d}" for p in parcels["pid"]])
parcels[["pid", "parcel_code", "crop_code", "crop_name", "geometry"]].to_file(HERE / "parcels.gpkg")

meteo = pd.read_csv(SHARED / "meteo.csv")
meteo = meteo[(meteo["sample"] == SAMPLE) & meteo["date"].str.startswith("2018")]
table = pd.DataFrame({"lon": CELL[0], "lat": CELL[1], "date": meteo["date"].to_numpy()})
for ours, theirs in VARIABLES.items():
    table[ours] = meteo[theirs].to_numpy()
table.to_csv(HERE / "agera5-2018.csv", index=False)

days = (pd.to_datetime(table["date"]) - pd.Timestamp("1970-01-01")).dt.days.to_numpy()
with netcdf_file(HERE / "agera5-2018.nc", "w") as nc:
    nc.Conventions = "CF-1.6"
    nc.createDimension("time", len(days))
    nc.createDimension("lat", 2)
    nc.createDimension("lon", 2)
    time = nc.createVariable("time", "i4", ("time",))
    time[:], time.units, time.calendar = days, "days since 1970-01-01", "standard"
    lat = nc.createVariable("lat", "f8", ("lat",))
    lat[:], lat.units, lat.standard_name = [CELL[1] + 0.1, CELL[1]], "degrees_north", "latitude"
    lon = nc.createVariable("lon", "f8", ("lon",))
    lon[:], lon.units, lon.standard_name = [CELL[0], CELL[0] + 0.1], "degrees_east", "longitude"
    for name in VARIABLES:
        grid = np.full((len(days), 2, 2), -9999.0, dtype="f4")
        grid[:, 1, 0] = table[name].to_numpy()
        variable = nc.createVariable(name, "f4", ("time", "lat", "lon"))
        variable[:] = grid
        variable._FillValue = np.float32(-9999.0)
        variable.units = "mm" if name == "prec" else "degC"
