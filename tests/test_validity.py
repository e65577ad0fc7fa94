"""The one observation-validity policy: its screens, its configuration, and its use on real data."""

from __future__ import annotations

import numpy as np
import pytest

from cbm_core.errors import ConfigError
from cbm_core.model import ValidityPolicy


def hist(**classes: int) -> np.ndarray:
    row = np.zeros(12)
    for name, count in classes.items():
        row[int(name[1:])] = count
    return row


def test_scl_haze_dip_and_same_day_screens_with_reasons():
    policy = ValidityPolicy()
    pid = np.array([1, 1, 1, 1, 1, 1, 2])
    t = np.array([0.0, 5, 10, 15, 20, 20.2, 0])
    h = np.array(
        [
            hist(c4=100),
            hist(c10=100),
            hist(c4=97, c8=3),
            hist(c4=60, c3=40),
            hist(c4=100),
            hist(c4=99, c9=1),
            hist(c0=50),
        ]
    )
    blue = np.array([0.03, 0.03, 0.12, 0.03, 0.03, 0.03, 0.03])
    red = np.array([0.04, 0.04, 0.10, 0.04, 0.04, 0.04, 0.04])
    out = policy.screen(pid, t, h, blue, red)
    assert out.valid.tolist() == [True, False, False, False, True, False, False]
    assert out.reason.tolist() == [
        "",
        "SCL thin cirrus 100% > 5%",  # cirrus is unusable: the April 2023 demo's greens rested on it
        "haze: B02 - 0.5 B04 = 0.070 > 0.05",  # 3 % cloud passes SCL, the blue excess does not
        "SCL shadow 40% > 5%",
        "",
        "second observation of the day",
        "SCL no data 100% > 5%",
    ]
    np.testing.assert_allclose(out.unusable[:2], [0.0, 1.0])


def test_dip_that_recovers_is_rejected_but_a_cut_is_not():
    policy = ValidityPolicy()
    pid = np.ones(8, int)
    t = np.array([0.0, 5, 10, 15, 40, 45, 50, 60])
    #             haze dip: back in 5 days   | cut 0.8 -> 0.5 regrowing slowly
    ndvi = np.array([0.8, 0.5, 0.8, 0.8, 0.8, 0.5, 0.55, 0.7])
    out = policy.screen(pid, t, ndvi=ndvi)
    assert out.valid.tolist() == [True, False, True, True, True, True, True, True]
    assert out.reason[1] == "NDVI dip 0.50 between 0.80 and 0.80 5 d later"
    assert ValidityPolicy(dip=None).screen(pid, t, ndvi=ndvi).valid.all()


def test_policy_from_a_scheme_table_refuses_what_it_does_not_know():
    policy = ValidityPolicy.from_table({"unusable_classes": [3, 8, 9], "max_haze": False, "dip": 0.2})
    assert policy.unusable_classes == (3, 8, 9) and policy.max_haze is None and policy.dip == 0.2
    assert ValidityPolicy.of({"validity": policy}) is policy
    assert ValidityPolicy.of({}) == ValidityPolicy()
    with pytest.raises(ConfigError, match=r"\[validity\]: unknown key\(s\) max_cloudy"):
        ValidityPolicy.from_table({"max_cloudy": 0.1})
    with pytest.raises(ConfigError, match=r"'unusable_classes' must list SCL classes 0\.\.11"):
        ValidityPolicy.from_table({"unusable_classes": [12]})
    with pytest.raises(ConfigError, match=r"'max_unusable_share' is a share"):
        ValidityPolicy.from_table({"max_unusable_share": 5})
