"""Quantize stage: exact band mapping, properties, fitted stats vs numpy, errors, determinism."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from jobs import config as jobconfig
from pipeline import quantize as Q
from pipeline import fs
from pipeline.backend import read_folder
from pipeline.stage import Resources
from schemas import stats as S
from schemas import tables as T

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = Q.QuantizeConfig(mu=3.80, sigma=0.20)


def scores_table(pmos, status=None) -> pa.Table:
    n = len(pmos)
    status = list(status) if status is not None else [T.OK] * n
    cols = {
        T.CLIP_ID: [f"{i:032x}" for i in range(n)], T.AUDIO_PATH: [f"/a/{i}.wav" for i in range(n)],
        T.SOURCE_DIGEST: ["d"] * n, T.START_S: [0.0] * n, T.DURATION_S: [10.24] * n,
        T.SOURCE_DURATION_S: [30.0] * n, T.SOURCE_SAMPLE_RATE: [44100] * n, T.SOURCE_CHANNELS: [2] * n,
        T.SOURCE_FORMAT: ["WAV"] * n, T.SOURCE_SIZE_BYTES: [1000] * n, T.SOURCE_MTIME_NS: [0] * n, T.CAPTION_ORIGINAL: ["c"] * n, T.TAGS: [["x"]] * n,
        T.METADATA_JSON: ["{}"] * n, T.STATUS: status,
        T.REASON: ["" if s == T.OK else "bad" for s in status], T.PMOS: list(pmos), T.SCORER: ["t"] * n,
    }
    blank = T.blank_row(T.SCORES_SCHEMA)  # no measured facts: analyze did not run
    cols = {f.name: cols.get(f.name, [blank[f.name]] * n) for f in T.SCORES_SCHEMA}
    return pa.table(cols, schema=T.SCORES_SCHEMA)


def corpus(n=997, seed=0):
    """Skewed scores with some rejected/error rows (error rows have no score)."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(3.8, 0.3, n) - rng.exponential(0.15, n), 1.0, 5.0)
    status = np.array([T.OK] * n, dtype=object)
    status[rng.choice(n, 40, replace=False)] = T.REJECTED
    err = rng.choice(np.flatnonzero(status == T.OK), 15, replace=False)
    status[err] = T.ERROR
    pmos = [None if s == T.ERROR else float(v) for s, v in zip(status, x)]
    return pmos, status.tolist()


def numpy_stats(pmos, status):
    x = np.array([p for p, s in zip(pmos, status) if s == T.OK], dtype=np.float64)
    m, sd = np.mean(x), np.std(x)  # ddof 0, as documented
    return len(x), m, sd, np.mean((x - m) ** 3) / sd**3


# --- pure: the exact official mapping --------------------------------------------------------


def test_official_numbers_exact_levels_and_prefixes():
    stats = Q.make_stats(Q.Moments(10, 3.7, 1.0, 0.0, 3.0, 4.5), OFFICIAL)
    assert stats.band_edges == (3.40, 3.60, 4.00, 4.20) and stats.fixed
    assert 3.80 - 1 * 0.20 != 3.60  # the float trap the rounding exists for (3.5999999999999996)
    expect = {3.39: 1, 3.40: 2, 3.59: 2, 3.60: 3, 3.99: 3, 4.00: 4, 4.19: 4, 4.20: 5}
    s = np.array(list(expect))
    assert Q.quality_levels(s, stats.band_edges).tolist() == list(expect.values())
    prefix = {3.39: S.PREFIX_LOW, 3.40: "", 3.59: "", 3.60: S.PREFIX_MEDIUM, 3.80: S.PREFIX_MEDIUM,
              4.00: S.PREFIX_MEDIUM, 4.01: "", 4.20: "", 4.2000001: S.PREFIX_HIGH, 1.0: S.PREFIX_LOW, 5.0: S.PREFIX_HIGH}
    got = Q.quality_prefixes(np.array(list(prefix)), stats.prefix_edges).tolist()
    assert got == list(prefix.values())


def test_edges_are_rounded_so_scores_on_an_edge_go_up():
    # unrounded, mu=3.7 sigma=0.2 gives edges 3.3000000000000003, 3.9000000000000004, 4.1000000000000005
    assert 3.7 + 2 * 0.2 != 4.1
    stats = Q.make_stats(Q.Moments(), Q.QuantizeConfig(mu=3.7, sigma=0.2))
    assert stats.band_edges == (3.3, 3.5, 3.9, 4.1)
    assert Q.quality_levels(np.array([3.3, 3.5, 3.9, 4.1]), stats.band_edges).tolist() == [2, 3, 4, 5]
    assert Q.quality_prefixes(np.array([3.5, 3.9, 4.1]), stats.prefix_edges).tolist() == [S.PREFIX_MEDIUM] * 2 + [""]


def test_quantize_table_passes_non_ok_rows_through():
    table = scores_table([3.39, None, 4.5, 3.8], [T.OK, T.ERROR, T.REJECTED, T.OK])
    stats = Q.make_stats(Q.Moments(10, 3.7, 1.0, 0.0, 3.0, 4.5), OFFICIAL)
    out = Q.quantize_table(table, stats)
    assert out.schema.equals(T.QUALITY_SCHEMA, check_metadata=True)
    assert out.select(T.SCORES_SCHEMA.names).equals(table)
    assert out.column(T.QUALITY_LEVEL).to_pylist() == [1, None, None, 3]
    assert out.column(T.QUALITY_PREFIX).to_pylist() == [S.PREFIX_LOW, "", "", S.PREFIX_MEDIUM]
    assert set(out.column(T.STATS_ID).to_pylist()) == {stats.id}


def test_ok_row_without_score_is_an_error_not_a_nan_level():
    stats = Q.make_stats(Q.Moments(10, 3.7, 1.0, 0.0, 3.0, 4.5), OFFICIAL)
    with pytest.raises(Q.QuantizeError, match="1 ok row"):
        Q.quantize_table(scores_table([3.5, None]), stats)
    with pytest.raises(Q.QuantizeError, match="non-finite"):
        Q.fit_from_moments(Q.moments_of(*Q.ok_scores(scores_table([3.5, 3.6, float("nan")]))))


# --- pure: properties ---------------------------------------------------------------------------

finite_scores = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(finite_scores, st.floats(-10, 10), st.floats(1e-3, 10), st.sampled_from([(-2, -1, 1, 2), (-3, -1.5, 0.5, 2.5)]))
def test_levels_in_range_monotone_and_match_bands(scores, mu, sigma, mult):
    edges = S.band_edges(mu, sigma, mult)
    s = np.sort(np.array(scores))
    lv = Q.quality_levels(s, edges)
    assert lv.dtype == np.int8
    assert lv.min() >= 1 and lv.max() <= T.NUM_QUALITY_LEVELS
    assert np.all(np.diff(lv.astype(int)) >= 0)
    for v, level in zip(s, lv):  # the written bands, one comparison at a time
        bounds = [-math.inf, *edges, math.inf]
        assert bounds[level - 1] <= v < bounds[level]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(1.0, 5.0), min_size=2, max_size=300), st.integers(1, 40))
def test_block_merge_matches_numpy_whatever_the_split(scores, k):
    x = np.array(scores)
    parts = [Q.moments_of(b) for b in np.array_split(x, min(k, len(x)))]
    m = Q.merge_all(parts[::-1])
    assert m.n == len(x) and m.min == x.min() and m.max == x.max()
    assert abs(m.mean - np.mean(x)) < 1e-9
    assert abs(math.sqrt(m.m2 / m.n) - np.std(x)) < 1e-9
    if np.std(x) > 1e-3:
        assert abs(math.sqrt(m.n) * m.m3 / m.m2**1.5 - sps.skew(x)) < 1e-9


def test_merge_order_does_not_change_bits():
    rng = np.random.default_rng(3)
    parts = [Q.moments_of(rng.normal(3.5, 0.4, int(n))) for n in rng.integers(1, 500, 30)]
    assert Q.merge_all(parts) == Q.merge_all(parts[::-1]) == Q.merge_all(sorted(parts, key=lambda p: p.m3))


@pytest.mark.parametrize("skew", [-0.8, -0.1, 0.0, 0.3, 0.95])
def test_skewnorm_method_of_moments_reproduces_the_moments(skew):
    sn = Q.skewnorm_from_moments(3.7, 0.25, skew)
    mean, var, g = sps.skewnorm.stats(sn.a, sn.loc, sn.scale, moments="mvs")
    assert abs(mean - 3.7) < 1e-9 and abs(math.sqrt(var) - 0.25) < 1e-9 and abs(g - skew) < 1e-9
    assert not sn.clipped


def test_skewnorm_clips_impossible_skewness():
    sn = Q.skewnorm_from_moments(3.7, 0.25, -2.5)
    assert sn.clipped and sn.a < 0 and math.isfinite(sn.a)


# --- pure: clear errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("pmos", [[], [3.7]])
def test_fewer_than_two_ok_rows_is_an_error(pmos):
    m = Q.moments_of(*Q.ok_scores(scores_table(pmos + [4.0], [T.OK] * len(pmos) + [T.REJECTED])))
    with pytest.raises(Q.QuantizeError, match=f"at least 2 ok rows .* found {len(pmos)}"):
        Q.make_stats(m, Q.QuantizeConfig())


def test_zero_spread_is_an_error_unless_mu_sigma_are_fixed():
    m = Q.moments_of(np.full(50, 3.9))
    with pytest.raises(Q.QuantizeError, match="zero spread"):
        Q.make_stats(m, Q.QuantizeConfig())
    stats = Q.make_stats(m, OFFICIAL)  # fixed bands need no fit; none is reported
    assert stats.fit is None and stats.band_edges == (3.40, 3.60, 4.00, 4.20)


def test_config_is_strict(tmp_path):
    with pytest.raises(ValueError, match="both mu and sigma"):
        Q.QuantizeConfig(mu=3.8)
    with pytest.raises(ValueError, match="sigma"):
        Q.QuantizeConfig(mu=3.8, sigma=0.0)
    with pytest.raises(ValueError, match=r"\[-1.0, -2.0, 1.0, 2.0\]"):
        Q.QuantizeConfig(band_multipliers=(-1.0, -2.0, 1.0, 2.0))
    y = tmp_path / "job.yaml"
    y.write_text("quantize:\n  mu: 3.8\n  sigma: 0.2\n  band_multipliers: [-2, -1, 1, 2]\n")
    assert jobconfig.load(Q.QuantizeConfig, y, section="quantize") == OFFICIAL
    y.write_text("quantize:\n  mu: 3.8\n  sigmaa: 0.2\n")
    with pytest.raises(jobconfig.ConfigError, match="sigmaa"):
        jobconfig.load(Q.QuantizeConfig, y, section="quantize")


def test_script_entrypoint_help():
    r = subprocess.run([sys.executable, str(REPO / "pipeline" / "quantize.py"), "--help"], cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--sigma" in r.stdout, r.stderr


# --- on Ray ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scores")
    pmos, status = corpus()
    fs.write_parts(scores_table(pmos, status), folder, rows_per_part=150)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("rows_per_part", [997, 100, 37])
def test_ray_fit_matches_numpy_for_any_number_of_blocks(ray_session, tmp_path, rows_per_part):
    pmos, status = corpus()
    fs.write_parts(scores_table(pmos, status), tmp_path, rows_per_part)
    m = Q.fit_moments(fs.list_parts(tmp_path))
    fit = Q.fit_from_moments(m)
    n, mean, sd, skew = numpy_stats(pmos, status)
    assert m.n == n
    assert abs(fit.mean - mean) < 1e-9 and abs(fit.std - sd) < 1e-9 and abs(fit.skewness - skew) < 1e-9
    assert abs(fit.skewness - sps.skew([p for p, s in zip(pmos, status) if s == T.OK])) < 1e-9


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_end_to_end_pass_through_determinism_and_resume(ray_session, scores_dir, tmp_path):
    cfg = Q.QuantizeConfig(resources=Resources(batch_size=64))
    res = Q.run(cfg, scores_dir, tmp_path / "a")
    out = read_folder(tmp_path / "a")
    inp = read_folder(scores_dir)
    assert out.num_rows == inp.num_rows and out.select(T.SCORES_SCHEMA.names).equals(inp)
    assert pq.read_schema(tmp_path / "a" / "part-00000.parquet").equals(T.QUALITY_SCHEMA)
    ok = np.array(out.column(T.STATUS).to_pylist()) == T.OK
    levels = np.array(out.column(T.QUALITY_LEVEL).to_pylist(), dtype=object)
    assert all(v is None for v in levels[~ok]) and set(out.column(T.QUALITY_PREFIX).filter(pa.array(~ok)).to_pylist()) == {""}
    assert levels[ok].tolist() == Q.quality_levels(np.array(inp.column(T.PMOS).to_pylist(), dtype=float)[ok],
                                                   res.stats.band_edges).tolist()
    assert set(out.column(T.STATS_ID).to_pylist()) == {res.stats.id}
    assert S.load(tmp_path / "a" / S.STAGE_STATS_FILE) == res.stats and not res.stats.fixed
    assert sum(res.report.level_counts) == res.stats.count == int(ok.sum()) == sum(res.report.hist_counts)
    assert (tmp_path / "a" / Q.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = _files(tmp_path / "a")

    # a re-run (resuming after a kill: only part 0 kept) rewrites the rest with the same bytes
    for name in first:
        if name not in ("part-00000.parquet", S.STAGE_STATS_FILE, fs.MARKER_FILE):  # what a kill leaves
            (tmp_path / "a" / name).unlink()
    Q.run(cfg, scores_dir, tmp_path / "a")
    assert _files(tmp_path / "a") == first

    # other bands: every part is made again with the new stats, never a mix of both
    official = Q.run(OFFICIAL, scores_dir, tmp_path / "a")
    assert official.stage.parts_skipped == 0 and official.stats.id != res.stats.id
    assert set(read_folder(tmp_path / "a").column(T.STATS_ID).to_pylist()) == {official.stats.id}
    assert S.load(tmp_path / "a" / S.STAGE_STATS_FILE) == official.stats


@pytest.mark.slow
def test_cli_fixed_official_numbers(ray_session, scores_dir, tmp_path, capsys):
    rc = Q.cli(["--input", str(scores_dir), "--output", str(tmp_path / "q"), "--mu", "3.80", "--sigma", "0.20"])
    printed = capsys.readouterr().out
    assert rc == 0
    stats = S.load(tmp_path / "q" / S.STAGE_STATS_FILE)
    assert stats.fixed and stats.band_edges == (3.40, 3.60, 4.00, 4.20) and stats.fit is not None
    assert "edges 3.4, 3.6, 4, 4.2" in printed and "level counts: 1:" in printed and "skew-normal" in printed


@pytest.mark.slow
def test_cli_reports_too_few_ok_rows_and_zero_spread(ray_session, tmp_path, capsys):
    fs.write_parts(scores_table([3.7, 2.0], [T.OK, T.REJECTED]), tmp_path / "one", 1)
    assert Q.cli(["--input", str(tmp_path / "one"), "--output", str(tmp_path / "o1")]) == 2
    assert "at least 2 ok rows" in capsys.readouterr().err
    fs.write_parts(scores_table([4.1] * 5), tmp_path / "flat", 2)
    assert Q.cli(["--input", str(tmp_path / "flat"), "--output", str(tmp_path / "o2")]) == 2
    assert "zero spread" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
