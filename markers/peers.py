"""Peers-outlier marker: a parcel's NDVI profile against same-crop parcels nearby.

Parcels declared with the same crop within a few kilometres share weather and calendar, so their
NDVI profiles agree; a parcel far from its peers' median profile (in units of the peers' own
spread) is suspicious whatever its crop. Needs no training data: the robust alternative when no
crop-type model exists. Peers are searched within the batch the marker receives; in a scheme, set
``context_distance`` (at least ``distance``) so that the engine batches parcels by area and adds
every parcel within that distance of a batch as context, and no neighbour is lost at a batch edge.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from cbm_core import impl
from cbm_core.model import Event, MarkerResult, Status, TimeSeries
from markers import _series as ts

NAME = "peers"
DEFAULTS: dict[str, Any] = {
    "distance": 2000.0,  # metres (in the parcels' CRS units), as the JRC parcelPeers query
    "max_peers": 10,
    "min_peers": 3,
    "season_start": "03-01",
    "season_end": "10-31",
    "step_days": 15,  # composite bin length
    "z_max": 3.0,  # RMS robust z-score above which the parcel is an outlier
    "min_spread": 0.05,  # NDVI floor of the peers' spread (avoids dividing by ~0)
    "min_clear_obs": 4,
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS) | {"context_distance"}


@impl
def cbm_marker_requires(params: Mapping[str, Any]) -> Mapping[str, list[str]]:
    return {"s2": ["B04", "B08"]}


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    problem = context_problem(params)
    if problem:  # the engine's call: warn about a scheme whose batches cut neighbourhoods
        warnings.warn(problem, UserWarning, stacklevel=2)
    return run(series, params)


def context_problem(params: Mapping[str, Any]) -> str | None:
    """Why the engine's batches would hide peers from each other under these scheme options (None: fine).

    Without ``context_distance`` the engine batches parcels by pid, so a parcel's neighbours in
    another batch are silently not compared and its score depends on the batch size.
    """
    name = params.get("name", NAME)
    distance = float(params.get("distance", DEFAULTS["distance"]))
    context = float(params.get("context_distance") or 0.0)
    if context <= 0:
        return (
            f"marker {name!r} (peers) has no context_distance: batches cut neighbourhoods and parcels "
            f"lose peers at batch edges; set context_distance = {distance:g} (at least distance)"
        )
    if context < distance:
        return (
            f"marker {name!r} (peers): context_distance {context:g} is below distance {distance:g}, "
            "so peers between those distances are lost at batch edges"
        )
    return None


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """Robust z-score of each parcel's NDVI profile against its same-crop neighbours."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    parcels = series.parcels.sort_values("pid")
    pids = parcels["pid"].to_numpy(np.int64)
    full, clear = ts.s2_panel(series, ("B04", "B08"), p, indices=("NDVI",))
    lo, hi = ts.season_bounds(full, p["season_start"], p["season_end"], ts.campaign_year(p))
    seen = ts.in_window(full, lo, hi)
    seen_pos = ts.align(seen, pids)
    seen_start, seen_end = ts.obs_ranges(seen, seen_pos)
    dropped = ts.rejected(seen)
    window_clear = ts.in_window(clear, lo, hi)
    clear_start, clear_end = ts.obs_ranges(window_clear, ts.align(window_clear, pids))
    step = float(p["step_days"])
    n_bins = max(1, int(np.ceil((hi + 1 - lo) / step)))
    pos = ts.align(clear, pids)
    prof = ts.composite(ts.in_window(clear, lo, hi), ("NDVI",), lo, step, n_bins)[..., 0]
    n_clear = ts.obs_count(ts.in_window(clear, lo, hi), pos)
    profile = np.full((len(pids), n_bins), np.nan)
    profile[pos >= 0] = ts.fill_bins(prof[:, :, None])[pos[pos >= 0], :, 0]
    valid = n_clear >= int(p["min_clear_obs"])

    located = parcels.geometry.notna().to_numpy() & ~parcels.geometry.is_empty.to_numpy()
    xy = np.zeros((len(pids), 2))
    if located.any():
        centroids = parcels.geometry[located].centroid
        xy[located] = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()])
    valid &= located
    crop = parcels["crop_name"].astype(str).to_numpy()
    peers = np.full((len(pids), int(p["max_peers"])), -1, dtype=np.int64)
    dist = np.full(peers.shape, np.nan)
    for c in np.unique(crop):
        members = np.flatnonzero((crop == c) & valid)
        if len(members) < 2:
            continue
        k = min(int(p["max_peers"]) + 1, len(members))
        d, j = cKDTree(xy[members]).query(xy[members], k=k, distance_upper_bound=float(p["distance"]))
        d, j = np.atleast_2d(d)[:, 1:], np.atleast_2d(j)[:, 1:]  # drop the parcel itself
        ok = np.isfinite(d)
        peers[members, : k - 1] = np.where(ok, members[np.minimum(j, len(members) - 1)], -1)
        dist[members, : k - 1] = np.where(ok, d, np.nan)
    n_peers = (peers >= 0).sum(axis=1)
    gathered = np.where(peers[..., None] >= 0, profile[np.maximum(peers, 0)], np.nan)
    with warnings.catch_warnings():  # parcels without peers give all-NaN slices, handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(gathered, axis=1)
        spread = 1.4826 * np.nanmedian(np.abs(gathered - median[:, None, :]), axis=1)
        spread = np.maximum(np.nan_to_num(spread, nan=float(p["min_spread"])), float(p["min_spread"]))
        z = (profile - median) / spread
        score = np.sqrt(np.nanmean(z**2, axis=1))
    worst = np.argmax(np.nan_to_num(np.abs(z), nan=-1), axis=1)

    names = [str(x) for x in clear.obs_names]
    z_max = float(p["z_max"])
    out = []
    for k, pid in enumerate(pids.tolist()):
        window, gap = ts.evidence_window(
            seen.t[seen_start[k] : seen_end[k]], window_clear.t[clear_start[k] : clear_end[k]], lo, hi
        )
        values = {
            "valid_observations": int(n_clear[k]),
            "window": window,
            "max_gap_days": gap,
            "n_clear": int(n_clear[k]),
            "n_peers": int(n_peers[k]),
        }
        if not located[k]:
            out.append(MarkerResult(name, pid, Status.NOT_VALID, "parcel has no geometry", values=values))
            continue
        if not valid[k]:
            reason = (
                f"{int(n_clear[k])} valid Sentinel-2 observation(s) in {window}, {p['min_clear_obs']} needed"
            )
            out.append(MarkerResult(name, pid, Status.NOT_VALID, reason, values=values, confidence=0.0))
            continue
        if n_peers[k] < int(p["min_peers"]):
            reason = (
                f"{int(n_peers[k])} parcel(s) declared {crop[k]} within {p['distance']:g} m with enough "
                f"valid observations, {p['min_peers']} needed"
            )
            out.append(MarkerResult(name, pid, Status.NOT_VALID, reason, values=values, confidence=0.0))
            continue
        s = float(score[k])
        values |= {
            "score": round(s, 3),
            "peer_pids": [int(pids[j]) for j in peers[k] if j >= 0],
            "max_peer_distance": round(float(np.nanmax(dist[k])), 1),
        }
        events = []
        if s >= z_max:
            mid = lo + (worst[k] + 0.5) * step
            day = ts.to_date(mid)
            events.append(
                Event(
                    ts.to_date(lo + worst[k] * step),
                    day,
                    ts.to_date(lo + (worst[k] + 1) * step - 1),
                    round(s, 3),
                    round(min(0.95, s / (2 * z_max)), 3),
                    (),
                    "outlier",
                )
            )
        confidence = min(1.0, n_peers[k] / (2 * int(p["min_peers"])))
        start, end = ts.obs_ranges(clear, pos[k : k + 1])
        used = tuple(names[i] for i in clear.obs[start[0] : end[0]])
        rejected = dropped[seen_pos[k]] if seen_pos[k] >= 0 else ()
        reason = (
            f"NDVI profile score {s:.2f} {'>=' if events else '<'} {z_max:g} against {int(n_peers[k])} "
            f"peers, {int(n_clear[k])} valid observation(s) {window}"
        )
        out.append(
            MarkerResult(name, pid, Status.OK, reason, events, values, round(confidence, 3), used, rejected)
        )
    return out
