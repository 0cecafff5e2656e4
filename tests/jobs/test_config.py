from dataclasses import dataclass, field

import pytest

from jobs import config as C
from pipeline.stage import Resources
from pipeline.score import ScoreConfig


def test_yaml_section_and_nested_dataclass(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("score:\n  scorer: wav2vec2\n  model: /m\n  resources: {batch_size: 4, num_gpus: 1}\n")
    cfg = C.load(ScoreConfig, path, section="score")
    assert cfg.scorer == "wav2vec2" and cfg.model == "/m"
    assert cfg.resources == Resources(batch_size=4, concurrency=1, num_cpus=1.0, num_gpus=1.0)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("score:\n  scorr: wav2vec2\n")
    with pytest.raises(C.ConfigError, match=r"unknown key\(s\) \['scorr'\]"):
        C.load(ScoreConfig, path, section="score")


def test_nested_unknown_key_and_wrong_type():
    with pytest.raises(C.ConfigError, match="batchsize"):
        C.from_dict(ScoreConfig, {"resources": {"batchsize": 3}})
    with pytest.raises(C.ConfigError, match="expected an integer, got 'four'"):
        C.from_dict(ScoreConfig, {"resources": {"batch_size": "four"}})
    with pytest.raises(C.ConfigError, match="'nope' is not one of"):
        C.from_dict(ScoreConfig, {"scorer": "nope"})


def test_value_checks_in_dataclasses_become_config_errors():
    with pytest.raises(C.ConfigError, match="batch_size must be >= 1, got 0"):
        C.from_dict(ScoreConfig, {"resources": {"batch_size": 0}})


def test_overrides_win_and_none_means_not_given(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("score:\n  scorer: wav2vec2\n")
    assert C.load(ScoreConfig, path, section="score", scorer=None).scorer == "wav2vec2"
    assert C.load(ScoreConfig, path, section="score", scorer="distillmos").scorer == "distillmos"


def test_save_resolved_is_stable(tmp_path):
    C.save_resolved(ScoreConfig(), tmp_path / "a.json")
    C.save_resolved(ScoreConfig(), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert b'"batch_size": 8' in (tmp_path / "a.json").read_bytes()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(ScoreConfig, tmp_path / "nope.yaml")
