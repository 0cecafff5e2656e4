"""Every stage folder opens as one table with pandas, pyarrow and Ray: it holds only Parquet parts
and `_`-prefixed side files (configs, stats, report, plot, marker, the LLM cache)."""

from __future__ import annotations

import unittest.mock as mock

import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from pipeline import caption as C
from pipeline import export as E
from pipeline import analyze, fs, ingest, quantize, score
from pipeline import llm as L
from pipeline.backend import read_folder
from schemas import stats as S
from schemas import tables as T


def _no_llm(cfg):
    """A processor that answers every prompt with a failed request: the caption stage then runs
    every one of its steps on Ray (LLM cache, candidates, CLAP step) with no engine to start."""

    def answer(row):
        out = {c: "" for c in L.LLM_ROW_COLUMNS}
        out.update({T.CLIP_ID: row[T.CLIP_ID], L.K_COL: int(row[L.K_COL]), L.ERROR_COL: "no LLM in this test"})
        return out

    return lambda ds: ds.map(answer)


@pytest.mark.slow
def test_every_stage_folder_opens_as_one_table_with_pandas_pyarrow_and_ray(sample_dir, tmp_path, ray_session):
    folders = {name: tmp_path / name for name in ("clips", "analyzed", "scores", "quality", "captions")}
    ingest.main(ingest.IngestConfig(rows_per_part=12), sample_dir / "manifest.csv", folders["clips"], progress=False)
    analyze.main(analyze.AnalyzeConfig(), folders["clips"], folders["analyzed"])
    score.main(score.ScoreConfig(), folders["analyzed"], folders["scores"])
    quantize.main(quantize.QuantizeConfig(), folders["scores"], folders["quality"])
    cap = C.CaptionConfig(clap=C.ClapConfig(backend="none"))
    with mock.patch.object(C.L, "build_processor", _no_llm):
        C.main(cap, folders["quality"], folders["captions"])

    side_files = {
        "clips": {ingest.CONFIG_FILE},
        "analyzed": {analyze.CONFIG_FILE},
        "scores": {score.CONFIG_FILE},
        "quality": {quantize.CONFIG_FILE, S.STAGE_STATS_FILE, quantize.REPORT_FILE, quantize.PLOT_FILE},
        "captions": {C.RESOLVED_CONFIG},
    }
    for name, folder in folders.items():
        names = {p.name for p in folder.iterdir()}
        assert side_files[name] <= names, (name, names)
        assert all(n.startswith("_") or (n.startswith(fs.PART_PREFIX) and n.endswith(fs.PART_SUFFIX)) for n in names), names
        expected = read_folder(folder)
        assert expected.num_rows == 33, name

        frame = pd.read_parquet(folder)
        assert len(frame) == expected.num_rows and list(frame.columns) == expected.column_names, name
        table = pads.dataset(folder, format="parquet").to_table()
        assert table.num_rows == expected.num_rows and table.column_names == expected.column_names, name
        assert sorted(table.column(T.CLIP_ID).to_pylist()) == sorted(expected.column(T.CLIP_ID).to_pylist())
        rows = ray_session.data.read_parquet(str(folder)).to_pandas()
        assert len(rows) == expected.num_rows and list(rows.columns) == expected.column_names, name

    # export finds the stats quantize wrote (its side-file name) next to the captions folder
    captions = read_folder(folders["captions"])
    ok = captions.filter(pc.equal(captions.column(T.STATUS), T.OK))
    found = E.find_stats(E.ExportConfig(), folders["captions"], ok)
    assert found == folders["quality"] / S.STAGE_STATS_FILE
