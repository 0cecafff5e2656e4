"""The quality-stats JSON: round trip, content id, validation."""

from __future__ import annotations

import json

import pytest

from schemas import stats as S

MULT = (-2.0, -1.0, 1.0, 2.0)


def fitted() -> S.QualityStats:
    fit = S.Fit(mean=3.71, std=0.25, skewness=-0.4, min=2.1, max=4.6,
                skewnorm=S.SkewNormal(a=-1.9, loc=3.93, scale=0.33))
    return S.make(1000, fit, fit.mean, fit.std, False, MULT, -2.0, 1.0, 2.0)


def official() -> S.QualityStats:
    return S.make(1000, fitted().fit, 3.80, 0.20, True, MULT, -2.0, 1.0, 2.0)


def test_official_edges_are_exact():
    st = official()
    assert st.band_edges == (3.40, 3.60, 4.00, 4.20)
    assert st.prefix_edges == {"low_below": 3.40, "medium_from": 3.60, "medium_to": 4.00, "high_above": 4.20}


@pytest.mark.parametrize("make", [fitted, official])
def test_round_trip_through_text_and_file(make, tmp_path):
    st = make()
    assert S.loads(S.dumps(st)) == st
    S.dump(st, tmp_path / S.STATS_FILE)
    assert S.load(tmp_path / S.STATS_FILE) == st
    assert (tmp_path / S.STATS_FILE).read_text() == S.dumps(st)  # stable bytes
    assert [p.name for p in tmp_path.iterdir()] == [S.STATS_FILE]  # no temporary left behind


def test_round_trip_without_fit():
    st = S.make(1, None, 3.8, 0.2, True, MULT, -2.0, 1.0, 2.0)
    assert S.loads(S.dumps(st)) == st


def test_id_follows_content():
    a, b = fitted(), official()
    assert len(a.id) == 16 and int(a.id, 16) >= 0
    assert a.id == fitted().id and a.id != b.id
    d = json.loads(S.dumps(a))
    assert d["id"] == a.id == S.stats_id(d)


def test_tampered_content_is_caught_by_the_id():
    d = json.loads(S.dumps(official()))
    d["count"] = 999
    with pytest.raises(S.StatsError, match="does not match the content"):
        S.from_dict(d)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(band_edges=[3.4, 3.6, 4.0, 4.3]), "do not follow"),
        (lambda d: d.update(sigma=0.0), "sigma must be > 0"),
        (lambda d: d.update(mu=float("nan")), "finite"),
        (lambda d: d.update(extra=1), "unknown \\['extra'\\]"),
        (lambda d: d.pop("prefix_edges"), "missing \\['prefix_edges'\\]"),
        (lambda d: d.update(version=99), "kind/version"),
        (lambda d: d.update(fixed=False), "differ from the fit"),
        (lambda d: d["fit"].update(std=-1.0), "fit.std must be > 0"),
        (lambda d: d.update(count=-1), "count must be"),
    ],
)
def test_validation_names_the_problem(change, message):
    d = official().to_dict(with_id=False)
    change(d)
    with pytest.raises(S.StatsError, match=message):
        S.from_dict(d)


def test_bad_files():
    with pytest.raises(S.StatsError, match="not valid JSON"):
        S.loads("{")
    with pytest.raises(S.StatsError, match="does not exist"):
        S.load("/nonexistent/quality_stats.json")
