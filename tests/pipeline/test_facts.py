"""Measured facts on synthetic signals whose answer is known, and on a few generated tracks."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from scipy import signal

from pipeline import factcheck as FC
from pipeline import facts as FX
from pipeline import synth
from schemas import facts as F

SR = 22050


def tone(hz: float = 440.0, seconds: float = 4.0, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float = 4.0, sr: int = SR, rms: float = 0.1, seed: int = 0) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


def music(seed: int = 0, **kw) -> np.ndarray:
    track = synth.Track(**{**dict(key=9, minor=True, bpm=120, lead="saw lead", pad="organ", drums=True), **kw})
    return synth.render_track(np.random.default_rng(seed), track, 6.0, SR)


# --- technical facts ---------------------------------------------------------------------------


def test_loudness_of_a_full_scale_1khz_sine_is_minus_3_lufs():
    # BS.1770: a 0 dBFS 1 kHz sine in one channel reads -3.01 LUFS
    f = FX.measure(tone(1000, 5, 48000, amp=1.0), 48000)
    assert f[F.LOUDNESS_LUFS] == pytest.approx(-3.01, abs=0.1)
    assert f[F.TRUE_PEAK_DBTP] == pytest.approx(0.0, abs=0.1)


def test_true_peak_sees_between_samples():
    x = tone(SR / 4, 1, amp=0.5)  # samples at 0, +-0.5 ... phase-shift it so no sample hits the crest
    x = (0.5 * np.sin(2 * np.pi * (SR / 4) * np.arange(SR) / SR + np.pi / 4)).astype(np.float32)
    assert np.abs(x).max() == pytest.approx(0.5 * np.sqrt(0.5), abs=1e-3)
    assert FX.true_peak_dbtp(x[None]) == pytest.approx(20 * np.log10(0.5), abs=0.3)


def test_clipping_counts_flat_tops_at_the_clip_peak_not_smooth_crests():
    x = music()
    assert FX.clipped_fraction(x[None]) < 1e-4
    clipped = np.clip(x * 4, -0.3, 0.3)  # clipped, then left below full scale
    assert FX.clipped_fraction(clipped[None]) > 0.05
    assert F.CLIPPING in FX.find_defects(FX.measure(clipped, SR))
    assert F.CLIPPING not in FX.find_defects(FX.measure(x, SR))
    low = tone(30, 4, 48000, amp=0.9)  # a slow crest spans several near-equal samples
    assert FX.clipped_fraction(low[None]) < 1e-3


def test_loudness_of_5_1_leaves_out_the_lfe_and_weighs_the_surrounds():
    """BS.1770 for 5.1 (L R C LFE Ls Rs): the LFE does not count and each surround weighs 1.41
    (+1.5 dB). Before, the first five channels were taken, so the LFE counted as a surround and
    the right surround was left out."""
    sine, quiet = tone(1000, 5, 48000, amp=0.5), np.zeros(5 * 48000, np.float32)
    alone = FX.measure(sine, 48000)[F.LOUDNESS_LUFS]
    def surround(i):
        return FX.measure(np.stack([sine if c == i else quiet for c in range(6)]), 48000)[F.LOUDNESS_LUFS]
    assert surround(0) == pytest.approx(alone, abs=0.05)  # L
    assert surround(5) == pytest.approx(alone + 10 * np.log10(1.41), abs=0.05)  # Rs
    assert surround(3) is None or surround(3) < -69  # the LFE alone: under the absolute gate
    stereo = FX.measure(np.stack([sine, sine]), 48000)[F.LOUDNESS_LUFS]
    assert stereo == pytest.approx(alone + 10 * np.log10(2), abs=0.05)


def test_a_lowpass_cliff_is_band_limited_and_a_soft_instrument_over_its_noise_floor_is_not():
    x = music()
    cut = signal.sosfilt(signal.butter(8, 2000, fs=SR, output="sos"), x).astype(np.float32)
    f_cut = FX.measure(cut, SR)
    assert 1500 < f_cut[F.BANDWIDTH_HZ] < 3000
    assert F.BAND_LIMITED in FX.find_defects(f_cut)
    assert FX.measure(x, SR)[F.BANDWIDTH_RATIO] == pytest.approx(1.0)
    # a soft sine melody (no treble at all) over a -70 dBFS room noise: not band-limited
    solo = synth.render_track(np.random.default_rng(1), synth.Track(2, False, 90, "flute", "", False, True, -70.0), 6.0, SR)
    f_solo = FX.measure(solo, SR)
    assert f_solo[F.BANDWIDTH_RATIO] == pytest.approx(1.0)
    assert FX.find_defects(f_solo) == []


def test_the_edge_is_the_same_at_any_sample_rate_and_a_cd_master_at_96_khz_lacks_nothing():
    """A cliff's edge does not depend on how far Nyquist lies above it. Before, the cliff test
    (nine bands in ten above the cut near silence) fired wherever music held under a tenth of
    the bands above, and the edge was read there: a CD master resampled to 192 kHz read 13.7
    kHz, one at 96 kHz 18.8, a 4 kHz lowpass at 96 kHz 0.46. And 22 kHz at 96 kHz is a low ratio to
    Nyquist but no defect: band_limited also needs the edge under `band_limited_hz` (20 kHz)."""
    x = music(seed=3)
    for cut_hz in (4000, 8000):
        edges = []
        for rate in (SR, 96000, 192000):
            y = librosa.resample(x, orig_sr=SR, target_sr=rate, res_type="soxr_hq") if rate != SR else x
            cut = signal.sosfiltfilt(signal.butter(12, cut_hz, fs=rate, output="sos"), y).astype(np.float32)
            edges.append(FX.measure(cut, rate)[F.BANDWIDTH_HZ])
        assert all(cut_hz * 0.97 < e < cut_hz * 1.2 for e in edges), (cut_hz, edges)
        assert max(edges) / min(edges) < 1.05, (cut_hz, edges)
    track = synth.Track(key=2, minor=False, bpm=100, lead="saw lead", pad="organ", drums=True)
    master = synth.render_track(np.random.default_rng(5), track, 6.0, 44100)  # a CD master: music up to 22 kHz
    cd = librosa.resample(master, orig_sr=44100, target_sr=96000, res_type="soxr_hq")  # ... released at 96 kHz
    f = FX.measure(cd, 96000)
    assert 20_500 < f[F.BANDWIDTH_HZ] < 23_000 and f[F.BANDWIDTH_RATIO] < 0.5  # the edge, give or take a sixth of an octave
    assert F.BAND_LIMITED not in FX.find_defects(f)
    assert F.BAND_LIMITED in FX.find_defects(f, FX.DefectThresholds(band_limited_hz=24_000))
    mp3_like = signal.sosfiltfilt(signal.butter(16, 16000, fs=96000, output="sos"), cd).astype(np.float32)
    assert F.BAND_LIMITED in FX.find_defects(FX.measure(mp3_like, 96000))


def test_a_steep_lowpass_over_a_loud_stop_band_is_band_limited_a_dark_mix_over_hiss_is_not():
    bright = music(seed=2, lead="square synth", pad="warm pad", drums=False)
    cut = signal.sosfilt(signal.butter(8, 800, fs=SR, output="sos"), bright).astype(np.float32)
    cut = np.round(cut * 32767) / 32767  # 16-bit: the stop band's partials sit above the -90 dB floor
    assert F.BAND_LIMITED in FX.find_defects(FX.measure(cut, SR))
    dark = synth.render_track(np.random.default_rng(4), synth.Track(5, False, 100, "electric piano", "string", False,
                                                                     noise_dbfs=-80.0), 6.0, SR)
    assert FX.measure(dark, SR)[F.BANDWIDTH_RATIO] == pytest.approx(1.0)  # falls into its hiss, not off a cliff


def test_a_dense_mix_that_never_goes_quiet_is_not_noise_and_white_hiss_reads_its_true_snr():
    """A wall of sustained chords over a bass drone, with no noise at all: its low bins never go
    quiet, which a floor averaged in power took for noise (about 19 dB here; real pop mixes read
    12.5). White hiss 12 dB under music reads about 12 dB, also after an encoder's lowpass."""
    t = np.arange(int(8 * SR)) / SR

    def saw(hz):
        return sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, 30))

    x = 2.0 * np.sin(2 * np.pi * 55 * t) + 1.5 * np.sin(2 * np.pi * 41.2 * t)
    for i, chord in enumerate([(110, 138.6, 164.8), (98, 123.5, 146.8), (87.3, 110, 130.8), (82.4, 103.8, 123.5)]):
        held = (t >= 2 * i) & (t < 2 * i + 2.05)
        x[held] += sum(saw(hz)[held] for hz in chord)
    x = (0.5 * x / np.abs(x).max()).astype(np.float32)
    dense = FX.measure(x, SR)
    assert dense[F.SNR_DB] > 30 and F.NOISY not in FX.find_defects(dense)

    song = music(seed=4)
    hiss = noise(len(song) / SR, rms=float(np.sqrt(np.mean(song**2) / 10 ** 1.2)), seed=1)  # 12 dB under
    assert FX.measure(song + hiss, SR)[F.SNR_DB] == pytest.approx(12.0, abs=1.5)
    lowpass = signal.butter(8, 4000, fs=SR, output="sos")
    dull = signal.sosfilt(lowpass, song + hiss).astype(np.float32)
    in_band = 10 * np.log10(np.mean(signal.sosfilt(lowpass, song) ** 2) / np.mean(signal.sosfilt(lowpass, hiss) ** 2))
    assert FX.measure(dull, SR)[F.SNR_DB] == pytest.approx(in_band, abs=2.0)


def test_noise_lowers_the_snr_estimate():
    x = music()
    clean = FX.measure(x, SR)
    p = float(np.mean(x**2))
    noisy = FX.measure(x + noise(6.0, rms=np.sqrt(p / 10 ** 0.5)), SR)  # 5 dB SNR
    assert clean[F.SNR_DB] > 25
    assert 0 < noisy[F.SNR_DB] < 10
    assert F.NOISY in FX.find_defects(noisy) and F.NOISY not in FX.find_defects(clean)


def test_quiet_dc_silence_and_stereo():
    quiet = FX.measure(tone(amp=0.003), SR)
    assert F.TOO_QUIET in FX.find_defects(quiet)
    dc = FX.measure(tone() + 0.05, SR)
    assert dc[F.DC_OFFSET] == pytest.approx(0.05, abs=1e-3) and F.DC in FX.find_defects(dc)
    half = np.concatenate([tone(seconds=1), np.zeros(3 * SR, np.float32)])
    f = FX.measure(half, SR)
    assert f[F.SILENCE_FRACTION] == pytest.approx(0.75, abs=0.03) and F.SILENT_PARTS in FX.find_defects(f)
    x = tone()
    assert FX.measure(np.stack([x, x]), SR)[F.STEREO_CORRELATION] == pytest.approx(1.0)
    assert FX.measure(np.stack([x, -x]), SR)[F.STEREO_CORRELATION] == pytest.approx(-1.0)
    assert FX.measure(x, SR)[F.STEREO_CORRELATION] is None


def test_a_channel_with_its_polarity_flipped_is_out_of_phase_and_a_wide_mix_is_not():
    """A miswired or badly transferred recording has one channel inverted: the mono downmix that
    p-MOS, CLAP and the trainer hear cancels (hollow, or silent outright). A wide mix, even two
    unrelated tracks, reads near 0 or above; inverting a channel of a mix negates its own
    correlation."""
    a, b = music(seed=1), music(seed=2, key=2, bpm=97, drums=False)
    wide = np.stack([0.7 * a + 0.3 * b, 0.3 * a + 0.7 * b])
    for stereo in (np.stack([a, a]), wide, np.stack([a, b])):
        assert F.OUT_OF_PHASE not in FX.find_defects(FX.measure(stereo, SR))
    for stereo in (np.stack([a, -a]), wide * np.array([[1.0], [-1.0]], np.float32)):
        f = FX.measure(stereo, SR)
        assert f[F.STEREO_CORRELATION] < -0.3 and F.OUT_OF_PHASE in FX.find_defects(f)
    assert F.OUT_OF_PHASE not in FX.find_defects(FX.measure(a, SR))  # mono: nothing to cancel


@pytest.mark.parametrize("sr", [16000, 44100, 48000])
def test_measure_works_at_any_rate_and_names_every_fact_column(sr):
    x = tone(440, 3, sr)
    f = FX.measure(np.stack([x, 0.5 * x]), sr)
    assert set(f) == set(F.FACT_NAMES) - {F.DEFECTS}
    assert f[F.BANDWIDTH_RATIO] <= 1.0 and 300 < f[F.SPECTRAL_CENTROID_HZ] < 700


def test_measure_refuses_non_finite_samples():
    x = tone()
    x[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FX.measure(x, SR)


def test_thresholds_decide_the_flags():
    f = {F.CLIPPED_FRACTION: 0.002, F.BANDWIDTH_RATIO: 0.5, F.SNR_DB: 30.0, F.LOUDNESS_LUFS: -20.0,
         F.DC_OFFSET: 0.0, F.SILENCE_FRACTION: 0.0}
    assert FX.find_defects(f) == [F.CLIPPING, F.BAND_LIMITED]
    assert FX.find_defects(f, FX.DefectThresholds(clipped_fraction=0.01, band_limited_ratio=0.4)) == []
    assert FX.find_defects({}) == []  # nothing measured, nothing flagged


# --- musical facts -----------------------------------------------------------------------------


def test_tempo_of_a_click_track():
    x = np.zeros(8 * SR, np.float32)
    click = noise(0.02, rms=0.5)
    for start in range(0, len(x) - len(click), int(SR * 60 / 100)):  # 100 bpm
        x[start:start + len(click)] += click
    f = FX.measure(x, SR)
    assert f[F.TEMPO_BPM] == pytest.approx(100, rel=0.04)
    assert f[F.TEMPO_CONFIDENCE] > 0.5


def pulses(bpm: float, seconds: float, rate: float, per_beat: int, accents: tuple[float, ...]) -> np.ndarray:
    """An onset envelope at `rate` Hz: `per_beat` pulses a beat at `bpm`, strengths cycling `accents`."""
    x = np.zeros(int(seconds * rate))
    step = rate * 60.0 / bpm / per_beat
    for i, t in enumerate(np.arange(0, len(x) - 1, step)):
        x[int(round(t))] += accents[i % len(accents)]
    return np.convolve(x, np.hanning(5), mode="same")


@pytest.mark.parametrize("bpm", [64.0, 100.0, 172.0])
def test_tempo_picks_the_beat_among_octaves_from_the_harmonic_rhythm(bpm):
    """Eighth notes, accented on the beat (any of three octaves could be the beat); chords change
    every 4 beats: that harmonic rhythm names the beat, at a slow, a middle and a fast tempo."""
    rate = SR / 256
    onsets = pulses(bpm, 10.0, rate, 2, (1.0, 0.6))
    chords = pulses(bpm / 4, 10.0, rate, 1, (1.0,))
    found, conf, octave = FX.tempo(onsets, rate, FX.MeasureConfig(), chords, onset_rate_hz=2 * bpm / 60)
    assert found == pytest.approx(bpm, rel=0.04)
    assert conf > 0.3
    assert octave >= 0.7  # the harmonic rhythm names the octave
    plain, _, plain_octave = FX.tempo(onsets, rate, FX.MeasureConfig())  # no harmonic rhythm: right up to an octave
    assert min(abs(plain / bpm - r) for r in (0.5, 1.0, 2.0)) < 0.04
    assert plain_octave == 0.5  # no cue tells the octaves apart, however periodic: the octave is a guess


def test_the_backbeat_names_the_beat_in_music_with_drums():
    """A rock groove: kick on 1 and 3 (under 120 Hz), snare on 2 and 4 and hi-hats (over it) in
    sixteenths, the band's accents on 1 and 3, at a slow tempo. Kick to snare is one beat, which
    neither half nor double time keeps; with the percussive ratio of a kit, that names the beat
    where the tempo prior and the onset density alone pick double time (nearer 120 BPM).
    Without drums the cue has no weight."""
    rate, bpm, hats = SR / 256, 66.0, 4
    kick = pulses(bpm / 2, 10.0, rate, 1, (1.0,))  # beats 1 and 3
    snare_hats = np.roll(pulses(bpm / 2, 10.0, rate, 1, (0.8,)), int(round(rate * 60 / bpm)))  # beats 2 and 4
    snare_hats += pulses(bpm, 10.0, rate, hats, (0.25,) + (0.15,) * (hats - 1))
    upper = snare_hats + pulses(bpm / 2, 10.0, rate, 1, (0.8,))  # and a band's accents on 1 and 3
    both, rate_hz = kick + upper, hats * bpm / 60
    found, _, octave = FX.tempo(both, rate, FX.MeasureConfig(), onset_rate_hz=rate_hz, backbeat=(kick, upper, 0.01))
    assert found == pytest.approx(bpm, rel=0.04) and octave >= 0.7
    plain, _, _ = FX.tempo(both, rate, FX.MeasureConfig(), onset_rate_hz=rate_hz)
    assert plain != pytest.approx(bpm, rel=0.04)  # the cue is what names it: half or double time without it
    no_drums, _, _ = FX.tempo(both, rate, FX.MeasureConfig(), onset_rate_hz=rate_hz, backbeat=(kick, upper, 0.0))
    assert no_drums == pytest.approx(plain)


def test_a_fast_generated_rock_track_reads_its_beat_not_half_time():
    """Played by the generator at 170 BPM (bass and lead accents on 1 and 3 over a rock kit): the
    periodicity and the tempo prior read 85, the backbeat 170."""
    y = synth.render_track(np.random.default_rng(3), synth.Track(9, True, 170, "saw lead", "organ", True), 10.0, SR)
    assert FX.measure(y, SR)[F.TEMPO_BPM] == pytest.approx(170, rel=0.04)
    no_cue = FX.measure(y, SR, FX.MeasureConfig(tempo_backbeat_weight=0.0))[F.TEMPO_BPM]
    assert no_cue == pytest.approx(85, rel=0.04)
    # in a clipped clip flat-top bursts pass for a kit, so there the backbeat does not count
    # (the same mono signal and bandwidth as `measure` passes)
    mono, bandwidth, cfg = y - y.mean(), FX.measure(y, SR)[F.BANDWIDTH_HZ], FX.MeasureConfig()
    assert FX.musical_facts(mono, SR, cfg, bandwidth, clipped=0.0)[F.TEMPO_BPM] == pytest.approx(170, rel=0.04)
    assert FX.musical_facts(mono, SR, cfg, bandwidth, clipped=0.01)[F.TEMPO_BPM] == pytest.approx(85, rel=0.04)


def test_tempo_stays_in_its_range_on_irregular_envelopes():
    """Envelopes with no steady beat (random bursts): whatever is read, it is a tempo in the
    configured range, on the grid's candidate (the sub-grid step moves it by under 0.1 %). A
    parabola through a slope once put five of these 300 at 330-390 BPM, over the 240 maximum."""
    cfg, rate = FX.MeasureConfig(), SR / 256
    for seed in range(300):
        x = np.random.default_rng(seed).exponential(1.0, 860) ** 2
        found, conf, octave = FX.tempo(x, rate, cfg)
        assert found is not None and cfg.tempo_min_bpm <= found <= cfg.tempo_max_bpm, (seed, found)
        assert 0.0 <= conf <= 1.0 and 0.0 <= octave <= 1.0, (seed, conf, octave)


@pytest.mark.parametrize("bad, shown", [(dict(tempo_periodicity_weight=1.5), "1.5"), (dict(tempo_backbeat_ratio=0.0), "0.0"),
                                        (dict(tempo_backbeat_weight=-1.0), "-1.0")])
def test_tempo_settings_out_of_range_are_refused_with_the_value(bad, shown):
    with pytest.raises(ValueError, match=shown):
        FX.MeasureConfig(**bad)


def test_lagged_correlation_finds_what_follows_what():
    a = np.zeros(400)
    a[::40] = 1.0
    b = np.roll(a, 10)  # b follows a by 10 frames
    corr = FX.lagged_correlation(a, b, np.array([0.0, 10.0, 20.0, 30.0]))
    assert int(np.argmax(corr)) == 1 and corr[1] > 0.9
    assert not FX.lagged_correlation(np.ones(400), b, np.array([10.0])).any()  # a flat envelope: no correlation


def test_chroma_novelty_peaks_where_the_chord_changes_not_where_the_melody_moves():
    chroma = np.full((12, 80), 0.05)
    chroma[[0, 4, 7], :40] = 1.0  # C major
    chroma[[9, 0, 4], 40:] = 1.0  # A minor
    chroma[np.arange(80) % 12, np.arange(80)] += 0.5  # a melody walking through every pitch class
    nov = FX.chroma_novelty(chroma, 6)
    assert abs(int(np.argmax(nov)) - 40) <= 1


def test_drums_are_noise_like_percussive_transients_not_pitched_attacks_or_steady_noise():
    cfg = FC.FactCheckConfig()
    kit = music(seed=3, key=0, minor=False, bpm=100, lead="electric piano", pad="organ", drums=True)
    no_kit = music(seed=3, key=0, minor=False, bpm=100, lead="electric piano", pad="organ", drums=False)
    assert FX.measure(kit, SR)[F.PERCUSSIVE_RATIO] >= cfg.drums_present_ratio
    assert FX.measure(no_kit, SR)[F.PERCUSSIVE_RATIO] <= cfg.drums_absent_ratio  # struck notes, sharp attacks
    assert FX.measure(noise(6.0), SR)[F.PERCUSSIVE_RATIO] <= cfg.drums_absent_ratio  # broadband but steady
    dull = signal.sosfilt(signal.butter(8, 1000, fs=SR, output="sos"), kit).astype(np.float32)
    assert FX.measure(dull, SR)[F.PERCUSSIVE_RATIO] is None  # under 2 kHz left: cannot tell


def _hits(make, bpm: float, seconds: float, sr: int = 44100) -> np.ndarray:
    """A hit from `make(n, t)` on every beat, over a quiet organ chord (so there is music to
    share the energy with)."""
    n = int(seconds * sr)
    out = 0.05 * np.sum([np.sin(2 * np.pi * hz * np.arange(n) / sr) for hz in (262, 330, 392)], axis=0)
    length = int(0.3 * sr)
    t = np.arange(length) / sr
    for start in np.arange(0, n - length, 60.0 / bpm * sr).astype(int):
        out[start:start + length] += make(length, t)
    return out.astype(np.float32)


def test_real_drums_a_tilted_snare_is_found_and_an_808_kick_alone_is_never_no_drums():
    """A recorded snare's noise is tilted (louder low, up to 20 kHz) and sits on a body at
    ~180 Hz, so it is not flat from 200 Hz up: drums. An 808 kick is a falling sine with no
    noise at all: its low transients keep 'no drums' from being sure."""
    cfg = FC.FactCheckConfig()
    rng = np.random.default_rng(0)
    pink = signal.butter(1, 800, btype="low", fs=44100, output="sos")

    def snare(n, t):
        hiss = signal.sosfilt(pink, rng.standard_normal(n)) + 0.2 * rng.standard_normal(n)
        return (0.5 * hiss + 0.4 * np.sin(2 * np.pi * 180 * t)) * np.exp(-t / 0.06)

    def kick_808(n, t):
        return 0.9 * np.sin(2 * np.pi * (45 * t + 40 * 0.05 * (1 - np.exp(-t / 0.05)))) * np.exp(-t / 0.25)

    found = {}
    for make in (snare, kick_808):
        facts = FX.measure(_hits(make, 100, 8.0), 44100)
        facts[F.DEFECTS] = FX.find_defects(facts)
        found[make.__name__] = facts
    assert FC.confident_facts(found["snare"], cfg).drums is True, found["snare"][F.PERCUSSIVE_RATIO]
    kick = found["kick_808"]
    assert kick[F.KICK_RATIO] > 5 * cfg.kick_absent_ratio and FC.confident_facts(kick, cfg).drums is not False


def test_key_profiles_find_the_key_of_a_scale_weighted_profile():
    for tonic in (0, 5, 9):
        for mode, profile in ((F.MAJOR, FX._KK_MAJOR), (F.MINOR, FX._KK_MINOR)):
            k, m, r = FX.key_from_chroma(np.roll(profile, tonic))
            assert (k, m) == (tonic, mode) and r == pytest.approx(1.0)


def test_the_pitch_class_profile_is_what_the_key_is_found_from():
    f = FX.measure(music(seed=3, key=2, minor=False, bpm=100, drums=False), SR)
    profile = f[F.PITCH_CLASS_PROFILE]
    assert len(profile) == 12 and sum(profile) == pytest.approx(1.0) and min(profile) >= 0
    tonic, mode = F.KEY_NAMES.index(f[F.KEY]), f[F.MODE]
    assert FX.key_correlation(profile, tonic, mode) == pytest.approx(f[F.KEY_CONFIDENCE])
    assert max(profile) == profile[2] or max(profile) in (profile[6], profile[9])  # the D major triad sounds most


def test_noise_and_a_drum_loop_fit_no_key_so_no_key_claim_is_refuted_on_them():
    rng = np.random.default_rng(0)
    n = 8 * SR
    clips = {"white noise": 0.1 * rng.standard_normal(n), "brown noise": 0.001 * np.cumsum(rng.standard_normal(n)),
             "drum loop": synth._drums(n, SR, SR * 60 / 120, "rock", rng)}
    for name, y in clips.items():
        f = FX.musical_facts(y.astype(np.float32), SR, FX.MeasureConfig())
        c = FC.confident_facts(f)
        assert c.key is None and c.pitch_profile is None, (name, f[F.KEY_CONFIDENCE])
        assert FC.check("in F# major", f) == FC.check("in C minor", f) == [], name


def test_generated_tracks_tempo_key_and_drums():
    """A few generated tracks (loose: the benchmark measures the accuracy on hundreds)."""
    cases = [dict(key=9, minor=True, bpm=120, drums=True), dict(key=0, minor=False, bpm=100, drums=False),
             dict(key=7, minor=False, bpm=140, lead="plucked guitar", pad="string", drums=True)]
    tempo_ok = key_ok = 0
    for i, case in enumerate(cases):
        f = FX.measure(music(seed=i, **case), SR)
        ratio = f[F.TEMPO_BPM] / case["bpm"]
        assert min(abs(ratio - 1), abs(ratio - 2), abs(ratio - 0.5)) < 0.04  # right up to an octave, always
        tempo_ok += abs(ratio - 1) < 0.04
        key_ok += (F.KEY_NAMES.index(f[F.KEY]), f[F.MODE]) == (case["key"], F.MINOR if case["minor"] else F.MAJOR)
        drums = FC.confident_facts(f).drums
        assert drums is None or drums == case["drums"]  # unsure is allowed, wrong is not
    assert tempo_ok >= 2 and key_ok >= 2
