"""Grassland mowing marker: Sentinel-2 NDVI drops fused with Sentinel-1 6-day coherence rises.

A cut removes the canopy: NDVI falls by ~0.15-0.4 and recovers over ~3 weeks, while 6-day VV
coherence (low over growing grass) jumps for the first image pairs after the cut. Either sensor
alone can miss a cut (clouds, S1 gaps, rain), so each sensor proposes candidates and the fusion
keeps an S2 drop confirmed by S1 with high confidence, an unconfirmed drop when it is strong, and
an S1 rise alone only when S2 could not have seen the cut. All per-parcel work runs in one numba
kernel over pid-sorted arrays, so a batch of 100k parcels costs a few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba
import numpy as np

from cbm_core.hookspecs import impl
from cbm_core.model import Event, MarkerResult, Status, TimeSeries
from markers import _series as ts

NAME = "mowing"
DEFAULTS: dict[str, Any] = {
    "season_start": "03-16",  # MM-DD or a date (DOY 75-300 as in published comparisons)
    "season_end": "10-27",
    "min_drop": 0.1,  # NDVI drop of an S2 candidate
    "s2_alone_drop": 0.15,  # NDVI drop accepted when S1 coherence is present but silent
    "max_drop_days": 45,  # an NDVI fall slower than this is senescence or drought, not a cut
    "min_rise": 0.08,  # VV coherence rise above the recent same-orbit baseline
    "s1_alone_rise": 0.15,  # coherence rise accepted alone when S2 could not see the cut
    "s1_seen_rise": 0.2,  # coherence rise accepted when S2 saw only a slight NDVI decline
    "min_spacing_days": 20,  # two events closer than this are one event
    "min_clear_obs": 5,  # clear S2 observations needed in season (else S1 must suffice)
    "min_s1_obs": 10,  # coherence observations needed in season when S2 is insufficient
    "max_cloudy": ts.DEFAULT_MAX_CLOUDY,
    "cloud_classes": list(ts.DEFAULT_CLOUD_CLASSES),
    "coherence_band": "VV",
}

SRC_S2, SRC_S1, SRC_BOTH = 1, 2, 3


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    return run(series, params)


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """Detect cuts for every parcel of the batch: one result per parcel."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    pids = ts.batch_pids(series)
    full, s2 = ts.s2_panel(series, ("B04", "B08"), p, indices=("NDVI",))
    c6 = ts.build_panel(series.stats, "c6", (str(p["coherence_band"]),))
    c6 = ts.drop_missing(c6, (str(p["coherence_band"]),))
    lo, hi = ts.season_bounds(s2 if len(s2.t) else c6, p["season_start"], p["season_end"])
    s2_pos, c6_pos, full_pos = ts.align(s2, pids), ts.align(c6, pids), ts.align(full, pids)
    orbit_codes = _orbit_codes(c6)
    out = _kernel(
        *_ranges(s2, s2_pos),
        s2.t,
        s2.values["NDVI"],
        *_ranges(c6, c6_pos),
        c6.t,
        np.clip(c6.values[str(p["coherence_band"])], 0, 1),
        orbit_codes,
        lo,
        hi,
        float(p["min_drop"]),
        float(p["s2_alone_drop"]),
        float(p["max_drop_days"]),
        float(p["min_rise"]),
        float(p["s1_alone_rise"]),
        float(p["s1_seen_rise"]),
        float(p["min_spacing_days"]),
    )
    slot, n_ev, ev_src, ev_t, ev_f, ev_i, n_s2, n_c6, max_gap = out
    ev_parcel = np.repeat(np.arange(len(pids)), n_ev)
    within = np.arange(len(ev_parcel)) - np.repeat(np.cumsum(n_ev) - n_ev, n_ev)
    used = slot[:-1][ev_parcel] + within  # compact the per-parcel slots
    n_all = ts.obs_count(full, full_pos)
    n_clear_any = ts.obs_count(s2, s2_pos)
    with ts.no_gc():
        return _results(
            name,
            p,
            pids,
            s2,
            c6,
            ev_parcel,
            ev_src[used],
            ev_t[used],
            ev_f[used],
            ev_i[used],
            n_s2,
            n_c6,
            max_gap,
            n_all,
            n_clear_any,
        )


def _ranges(panel: ts.Panel, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    start, end = ts.obs_ranges(panel, pos)
    return start, end


def _orbit_codes(panel: ts.Panel) -> np.ndarray:
    if panel.orbit_code is None or not len(panel.t):
        return np.zeros(len(panel.t), dtype=np.int64)
    return np.maximum(panel.orbit_code, 0).astype(np.int64)


@numba.njit(cache=True)
def _median(buf: np.ndarray, n: int) -> float:
    """Median of the first n (few) values, sorted in place: no allocation in the hot loop."""
    for a in range(1, n):
        x = buf[a]
        b = a - 1
        while b >= 0 and buf[b] > x:
            buf[b + 1] = buf[b]
            b -= 1
        buf[b + 1] = x
    return buf[n // 2] if n % 2 else 0.5 * (buf[n // 2 - 1] + buf[n // 2])


@numba.njit(cache=True, parallel=True)
def _kernel(
    s_start,
    s_end,
    st,
    sv,
    c_start,
    c_end,
    ct,
    cv,
    corb,
    lo,
    hi,
    min_drop,
    s2_alone,
    max_drop_days,
    min_rise,
    s1_alone,
    s1_seen,
    spacing,
):
    """Per parcel: despike NDVI, find drop runs and coherence peaks, fuse, enforce spacing and season.

    Event arrays: ev_t = (start, main, end), ev_f = (magnitude, confidence), ev_i = (s2 before,
    s2 after, coherence) observation indices (-1 when unused).
    """
    n_p = len(s_start)
    slot = np.zeros(n_p + 1, np.int64)  # each parcel writes its events in its own slot range
    for p in range(n_p):
        slot[p + 1] = slot[p] + (s_end[p] - s_start[p]) + (c_end[p] - c_start[p]) + 1
    ev_src = np.empty(slot[n_p], np.int64)
    ev_t = np.empty((slot[n_p], 3))
    ev_f = np.empty((slot[n_p], 2))
    ev_i = np.empty((slot[n_p], 3), np.int64)
    n_ev = np.zeros(n_p, np.int64)
    n_s2 = np.zeros(n_p, np.int64)
    n_c6 = np.zeros(n_p, np.int64)
    max_gap = np.zeros(n_p)
    for p in numba.prange(n_p):
        buf = np.empty(8)
        first_ev = slot[p]
        w = first_ev
        # S2: clear observations in an extended window (cuts near the edges need context)
        idx = np.empty(s_end[p] - s_start[p], np.int64)
        m = 0
        for i in range(s_start[p], s_end[p]):
            if st[i] >= lo - 30 and st[i] <= hi + 30:
                idx[m] = i
                m += 1
        last = lo
        for k in range(m):
            t = st[idx[k]]
            if t >= lo and t <= hi + 1:
                n_s2[p] += 1
                max_gap[p] = max(max_gap[p], t - last)
                last = t
        max_gap[p] = max(max_gap[p], hi - last)
        # despike: a single low value that bounces back is haze or shadow, not a cut
        keep = np.ones(m, np.bool_)
        for k in range(1, m - 1):
            a, b, c = sv[idx[k - 1]], sv[idx[k]], sv[idx[k + 1]]
            if a - b > 0.05 and c - b > 0.6 * (a - b) and st[idx[k + 1]] - st[idx[k - 1]] <= 20:
                keep[k] = False
        q = 0
        for k in range(m):
            if keep[k]:
                idx[q] = idx[k]
                q += 1
        m = q
        # S2 drop runs
        cand_a = np.empty(m, np.int64)
        cand_b = np.empty(m, np.int64)
        nc = 0
        k = 0
        while k < m - 1:
            if sv[idx[k + 1]] < sv[idx[k]]:
                a = k
                while k < m - 1 and sv[idx[k + 1]] < sv[idx[k]]:
                    k += 1
                b = k
                drop = sv[idx[a]] - sv[idx[b]]
                dur = st[idx[b]] - st[idx[a]]
                # the steepest step must carry most of the fall: a cut is abrupt, senescence is not
                step = 0.0
                for r in range(a, b):
                    step = max(step, sv[idx[r]] - sv[idx[r + 1]])
                if drop >= min_drop and dur <= max_drop_days and step >= 0.6 * drop:
                    # a value that bounced straight back up is noise, not a cut
                    bounced = (
                        b + 1 < m
                        and st[idx[b + 1]] - st[idx[b]] <= 12
                        and sv[idx[b + 1]] - sv[idx[b]] > 0.7 * drop
                    )
                    if not bounced:
                        cand_a[nc] = idx[a]
                        cand_b[nc] = idx[b]
                        nc += 1
            else:
                k += 1
        # S1 coherence anomalies against the recent same-orbit baseline
        c0, c1 = c_start[p], c_end[p]
        nco = c1 - c0
        anom = np.full(nco, -1.0)
        for i in range(c0, c1):
            if ct[i] >= lo and ct[i] <= hi + 1:
                n_c6[p] += 1
            if ct[i] < lo - 30 or ct[i] > hi + 30:
                continue  # outside the season and its margin no event can be dated
            nb = 0
            j = i - 1
            while j >= c0 and nb < 4:
                if corb[j] == corb[i] and ct[i] - ct[j] <= 40:
                    buf[nb] = cv[j]
                    nb += 1
                j -= 1
            if nb >= 2:
                anom[i - c0] = cv[i] - _median(buf, nb)
        peak_i = np.empty(nco, np.int64)
        peak_mag = np.empty(nco)
        npk = 0
        i = 0
        while i < nco:
            if anom[i] >= min_rise:
                f = i
                mag = anom[i]
                while i + 1 < nco and anom[i + 1] >= min_rise and ct[c0 + i + 1] - ct[c0 + i] <= 7:
                    i += 1
                    mag = max(mag, anom[i])
                peak_i[npk] = c0 + f
                peak_mag[npk] = mag
                npk += 1
            i += 1
        used = np.zeros(npk, np.bool_)
        # fusion: S2 candidates, confirmed or not
        for c in range(nc):
            ta, tb = st[cand_a[c]], st[cand_b[c]]
            drop = sv[cand_a[c]] - sv[cand_b[c]]
            best = -1
            for j in range(npk):  # the strongest unused coherence peak that fits the drop
                tf = ct[peak_i[j]]
                fits = tf > ta + 1 and tf <= tb + 12 and not used[j]
                if fits and (best < 0 or peak_mag[j] > peak_mag[best]):
                    best = j
            has_c = False
            for i2 in range(c0, c1):
                if ct[i2] > ta and ct[i2] <= tb + 12:
                    has_c = True
                    break
            p2 = min(0.95, drop / (2 * min_drop))
            if best >= 0:
                used[best] = True
                tf = ct[peak_i[best]]
                main = min(max(tf - 7.5, ta), tb)
                p1 = min(0.95, peak_mag[best] / (2 * min_rise))
                conf = 1 - (1 - p2) * (1 - p1)
                src = SRC_BOTH
                ci = peak_i[best]
                mag = drop
            elif drop >= s2_alone or not has_c:
                main = max(0.5 * (ta + tb), tb - 8)
                conf = p2 * (0.7 if has_c else 0.85)
                src = SRC_S2
                ci = -1
                mag = drop
            else:
                continue
            ev_src[w] = src
            ev_t[w, 0], ev_t[w, 1], ev_t[w, 2] = ta, main, tb
            ev_f[w, 0], ev_f[w, 1] = mag, conf
            ev_i[w, 0], ev_i[w, 1], ev_i[w, 2] = cand_a[c], cand_b[c], ci
            w += 1
        # S1 alone where S2 was blind around the cut
        for j in range(npk):
            if used[j] or peak_mag[j] < s1_alone:
                continue
            tf = ct[peak_i[j]]
            d = tf - 7.5
            before = -1
            after = -1
            for k in range(m):
                t = st[idx[k]]
                if t <= d and t >= d - 12:
                    before = idx[k]
                if t > d and t <= d + 10 and after < 0:
                    after = idx[k]
            # S2 saw the field around the cut: only a strong rise over some NDVI decline survives
            seen = before >= 0 and after >= 0
            if seen and (peak_mag[j] < s1_seen or sv[before] - sv[after] <= 0):
                continue
            ev_src[w] = SRC_S1
            ev_t[w, 0], ev_t[w, 1], ev_t[w, 2] = tf - 9, d, tf
            ev_f[w, 0], ev_f[w, 1] = peak_mag[j], 0.7 * min(0.95, peak_mag[j] / (2 * min_rise))
            ev_i[w, 0], ev_i[w, 1], ev_i[w, 2] = -1, -1, peak_i[j]
            w += 1
        # order by main date, keep season, merge events closer than the spacing
        cnt = w - first_ev
        if cnt == 0:
            continue
        order = np.argsort(ev_t[first_ev:w, 1]) + first_ev
        tmp_src = ev_src[order].copy()
        tmp_t = ev_t[order].copy()
        tmp_f = ev_f[order].copy()
        tmp_i = ev_i[order].copy()
        w = first_ev
        for r in range(cnt):
            if tmp_t[r, 1] < lo or tmp_t[r, 1] >= hi + 1:
                continue
            if w > first_ev and tmp_t[r, 1] - ev_t[w - 1, 1] < spacing:
                if tmp_f[r, 1] > ev_f[w - 1, 1]:
                    ev_src[w - 1] = tmp_src[r]
                    ev_t[w - 1] = tmp_t[r]
                    ev_f[w - 1] = tmp_f[r]
                    ev_i[w - 1] = tmp_i[r]
                continue
            ev_src[w] = tmp_src[r]
            ev_t[w] = tmp_t[r]
            ev_f[w] = tmp_f[r]
            ev_i[w] = tmp_i[r]
            w += 1
        n_ev[p] = w - first_ev
    return slot, n_ev, ev_src, ev_t, ev_f, ev_i, n_s2, n_c6, max_gap


def _results(
    name: str,
    p: Mapping[str, Any],
    pids: np.ndarray,
    s2: ts.Panel,
    c6: ts.Panel,
    ev_parcel: np.ndarray,
    ev_src: np.ndarray,
    ev_t: np.ndarray,
    ev_f: np.ndarray,
    ev_i: np.ndarray,
    n_s2: np.ndarray,
    n_c6: np.ndarray,
    max_gap: np.ndarray,
    n_all: np.ndarray,
    n_clear_any: np.ndarray,
) -> list[MarkerResult]:
    """Assemble one MarkerResult per parcel from the kernel's flat event arrays."""
    s2_names = [str(x) for x in s2.obs_names]
    c6_names = [str(x) for x in c6.obs_names]
    s2_obs, c6_obs = s2.obs.tolist(), c6.obs.tolist()
    ev_i = ev_i.tolist()
    day = np.floor(ev_t).astype(np.int64)
    base = int(day.min()) if len(day) else 0
    table = [ts.to_date(base + d) for d in range(int(day.max()) - base + 1)] if len(day) else []
    ev_d = (day - base).tolist()  # event dates as indices into one table of date objects
    ev_mag = np.round(ev_f[:, 0], 4).tolist()
    ev_conf = np.round(ev_f[:, 1], 3).tolist()
    kinds = {SRC_S2: "mowing:s2", SRC_S1: "mowing:s1", SRC_BOTH: "mowing:s2+s1"}
    ev_kind = [kinds[x] for x in ev_src.tolist()]
    bounds = np.searchsorted(ev_parcel, np.arange(len(pids) + 1))
    min_clear, min_s1 = int(p["min_clear_obs"]), int(p["min_s1_obs"])
    max_gap = np.round(max_gap, 1)
    out = []
    n_s2, n_c6, n_all, max_gap = n_s2.tolist(), n_c6.tolist(), n_all.tolist(), max_gap.tolist()
    n_clear_any = n_clear_any.tolist()
    bounds = bounds.tolist()
    for k, pid in enumerate(pids.tolist()):
        ns2, nc6 = n_s2[k], n_c6[k]
        values = {"n_clear_s2": ns2, "n_s2": n_all[k], "n_coherence": nc6, "max_gap_s2": max_gap[k]}
        if ns2 < min_clear and nc6 < min_s1:
            if n_all[k] == 0 and nc6 == 0:
                reason = "no Sentinel-2 B04/B08 nor Sentinel-1 coherence observation in the season"
            elif n_clear_any[k] == 0 and n_all[k] > 0:
                reason = f"all {n_all[k]} Sentinel-2 observations cloudy or invalid, {nc6} S1 coherence"
            else:
                reason = (
                    f"too few observations in season: {ns2} clear S2 (need {min_clear}) and "
                    f"{nc6} S1 coherence (need {min_s1})"
                )
            out.append(MarkerResult(name, pid, Status.NOT_VALID, reason, values=values, confidence=0.0))
            continue
        events = []
        obsids: list[str] = []
        for e in range(bounds[k], bounds[k + 1]):
            ia, ib, ic = ev_i[e]
            used = [s2_names[s2_obs[i]] for i in (ia, ib) if i >= 0] + (
                [c6_names[c6_obs[ic]]] if ic >= 0 else []
            )
            obsids += used
            d0, d1, d2 = ev_d[e]
            events.append(
                Event(table[d0], table[d1], table[d2], ev_mag[e], ev_conf[e], tuple(used), ev_kind[e])
            )
        values["n_events"] = len(events)
        values["n_observations"] = ns2 + nc6
        if events:
            conf = sum(e.confidence for e in events) / len(events)
        else:  # confidence that no cut was missed: dense S2 coverage or steady coherence
            cov_s2 = min(1.0, max(0.0, 1 - (max_gap[k] - 15) / 45)) if ns2 >= min_clear else 0.0
            cov_s1 = 0.8 if nc6 >= min_s1 else 0.0
            conf = max(cov_s2, cov_s1)
        out.append(MarkerResult(name, pid, Status.OK, "", events, values, round(conf, 3), tuple(obsids)))
    return out
