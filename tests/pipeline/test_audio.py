import numpy as np
import pytest
import soundfile as sf

from pipeline import audio


@pytest.fixture()
def wav(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, (0.2 * np.sin(np.arange(16000 * 2) / 5)).astype(np.float32), 16000)
    return path


def test_a_small_overstatement_of_the_length_is_padded(wav):
    x = audio.load_clip(wav, 1.0, 1.1, None)  # 0.1 s past the end, within the slack
    assert x.shape == (17600,) and not x[16000:].any()


def test_a_clip_well_past_the_end_is_truncated(wav):
    with pytest.raises(audio.AudioError, match="truncated: decoded 16000 of 32000"):
        audio.load_clip(wav, 1.0, 2.0, None)


def test_a_changed_sample_rate_is_reported(wav):
    with pytest.raises(audio.AudioError, match="the file is 16000 Hz now, the table says 22050 Hz"):
        audio.load_clip(wav, 0.0, 1.0, None, expected_sr=22050)
    assert audio.load_clip(wav, 0.0, 1.0, 8000, mono=False, expected_sr=16000).shape == (1, 8000)
