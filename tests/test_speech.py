"""The eSpeak NG speech corpus: speaker split, dynamic mixing, the cache, and the trainer on it."""

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from dynamics.tasks.separation import speech  # noqa: E402
from dynamics.tasks.separation.data import check_data, datasets  # noqa: E402
from dynamics.tasks.separation.speech import CorpusConfig, SpeechMixtures, load_corpus  # noqa: E402

TINY = CorpusConfig(speakers=6, held_out=2, utterances=2, min_words=2, max_words=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_corpus(TINY)


def _digest(c) -> str:
    return hashlib.sha256(c.audio.tobytes()).hexdigest()


def test_corpus_is_8khz_speech_of_distinct_speakers(corpus):
    assert corpus.audio.dtype == np.int16 and len(corpus.texts) == 12 and len(corpus.speakers) == 6
    assert corpus.lengths.sum() == len(corpus.audio) and corpus.lengths.min() > 0.3 * speech.SAMPLE_RATE
    assert len({(s["voice"], s["pitch"], s["rate"]) for s in corpus.speakers}) == 6
    for u in range(len(corpus.texts)):
        x = corpus.utterance(u).astype(np.float64)
        assert np.abs(x).max() == pytest.approx(0.9, abs=1e-3)
        assert np.sqrt(np.mean(x**2)) == pytest.approx(corpus.rms[u], rel=1e-6)
        # no DC, and the resampler's low-pass left nothing folded in just below the new Nyquist frequency
        power = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / speech.SAMPLE_RATE)
        assert abs(x.mean()) < 1e-3 and power[freqs > 3900].sum() < 0.02 * power.sum()


def test_held_out_speakers_never_occur_in_training_mixtures(corpus):
    train = SpeechMixtures(corpus, "train", count=64, n_samples=2048, seed=0)
    held_out = SpeechMixtures(corpus, "eval", count=40, n_samples=2048, seed=0)
    train_ids, eval_ids = set(corpus.speaker_ids("train")), set(corpus.speaker_ids("eval"))
    assert train_ids.isdisjoint(eval_ids) and len(train_ids) == 4 and len(eval_ids) == 2
    rng = np.random.default_rng(0)
    seen, gains = set(), []
    for _ in range(3000):
        d = train.draw(rng)
        a, b = (int(corpus.speaker[u]) for u in d.utterances)
        assert a != b and {a, b} <= train_ids
        seen |= {a, b}
        gains.append(d.gain_db)
    assert seen == train_ids
    assert -5 <= min(gains) < -4.9 and 4.9 < max(gains) <= 5 and abs(np.mean(gains)) < 0.2
    for d in held_out.draws:
        a, b = (int(corpus.speaker[u]) for u in d.utterances)
        assert a != b and {a, b} == eval_ids
    voice = {s["id"]: s["voice"] for s in corpus.speakers}
    assert {voice[k] for k in train_ids}.isdisjoint(voice[k] for k in eval_ids)


def test_training_segment_is_a_pure_function_of_its_generator(corpus):
    train = SpeechMixtures(corpus, "train", count=8, n_samples=2048, seed=0)
    m1, s1 = train.segment(3, np.random.default_rng([0, 3, 7, 1]))
    m2, s2 = train.segment(3, np.random.default_rng([0, 3, 7, 1]))
    m3, _ = train.segment(3, np.random.default_rng([0, 3, 8, 1]))
    assert m1.dtype == s1.dtype == np.float32 and m1.shape == (2048,) and s1.shape == (2, 2048)
    assert np.array_equal(m1, m2) and np.array_equal(s1, s2)
    assert not np.allclose(m1, m3)
    assert np.allclose(m1, s1.sum(axis=0), atol=1e-7) and np.abs(m1).max() == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(IndexError):
        train.segment(8, np.random.default_rng(0))


def test_sources_are_the_drawn_utterances_at_the_drawn_level(corpus):
    # oracle: each source is a scaled copy of its utterance cut at its start; the scales' ratio is
    # the drawn level on top of equal utterance loudness (RMS)
    train = SpeechMixtures(corpus, "train", count=1, n_samples=3 * speech.SAMPLE_RATE, seed=0)
    rng = np.random.default_rng(11)
    for _ in range(20):
        state = rng.bit_generator.state
        d = train.draw(rng)
        rng.bit_generator.state = state
        _, sources = train.segment(0, rng)
        scales = []
        for k, (u, start) in enumerate(zip(d.utterances, d.starts)):
            x = corpus.utterance(u).astype(np.float64)
            ref = np.zeros(train.n_samples)
            for j in range(train.n_samples):
                if 0 <= start + j < len(x):
                    ref[j] = x[start + j]
            scale = sources[k] @ ref / (ref @ ref)
            assert np.allclose(sources[k], scale * ref, atol=1e-6)
            scales.append(scale * corpus.rms[u])
        assert 20 * np.log10(scales[1] / scales[0]) == pytest.approx(d.gain_db, abs=1e-3)


def test_held_out_set_is_fixed_by_the_seed(corpus):
    a = SpeechMixtures(corpus, "eval", count=5, n_samples=2048, seed=4)
    b = SpeechMixtures(corpus, "eval", count=5, n_samples=2048, seed=4)
    c = SpeechMixtures(corpus, "eval", count=5, n_samples=2048, seed=5)
    assert np.array_equal(a.mixtures, b.mixtures)
    assert not np.allclose(a.mixtures, c.mixtures)
    for i in range(5):
        got = a.segment(i, np.random.default_rng(i + 100))[0]
        assert np.array_equal(got, a.segment(i, np.random.default_rng(0))[0]) and np.array_equal(got, a[i][0])


def test_cache_is_reused_without_synthesis(corpus, monkeypatch):
    monkeypatch.setenv("DYN_CACHE", str(corpus.path.parents[1]))

    def fail(*args):
        raise AssertionError("synthesized although the corpus is cached")

    monkeypatch.setattr(speech, "_synthesize_in_child", fail)
    again = load_corpus(TINY)
    assert again.path == corpus.path and np.array_equal(again.audio, corpus.audio)
    assert again.texts == corpus.texts


@pytest.mark.parametrize("damage", ["flip", "no-manifest"])
def test_damaged_cache_is_rebuilt(corpus, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("DYN_CACHE", str(tmp_path))
    folder = speech.corpus_dir(TINY)
    shutil.copytree(corpus.path, folder)
    if damage == "flip":
        raw = bytearray((folder / "audio.npy").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (folder / "audio.npy").write_bytes(bytes(raw))
    else:
        (folder / "manifest.json").unlink()
    killed = folder.parent / f".build-{folder.name}-killed"  # a build killed two days ago
    killed.mkdir()
    os.utime(killed, (time.time() - 2 * 86400,) * 2)
    builds = []
    real = speech._synthesize_in_child

    def copy(plan_file, out):
        builds.append(out)
        for name in ("audio.npy", "index.json", "manifest.json"):
            shutil.copy(corpus.path / name, out / name)

    # the flipped byte gets a real synthesis, in a fresh process: it must give the same audio as the first
    monkeypatch.setattr(speech, "_synthesize_in_child", lambda *a: (builds.append(a[1]), real(*a)))
    if damage == "no-manifest":
        monkeypatch.setattr(speech, "_synthesize_in_child", copy)
    again = load_corpus(TINY)
    assert len(builds) == 1 and again.path == folder and _digest(again) == _digest(corpus)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary, stale or damaged folder left


def _racer(barrier, results):
    real = speech._synthesize_in_child

    def gated(plan_file, out):
        barrier.wait(timeout=120)  # both processes synthesize at once, so both try to rename their copy in
        real(plan_file, out)

    speech._synthesize_in_child = gated
    try:
        results.put(_digest(load_corpus(TINY)))
    except Exception as e:  # reported to the test, not lost in a child's traceback
        results.put(repr(e))


def test_two_processes_filling_the_cache_at_once_agree(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DYN_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("fork")  # no re-import of torch per process; the synthesis runs in a fresh one
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    digests = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert digests == [_digest(corpus)] * 2
    folders = list((tmp_path / f"speech-v{speech.VERSION}").iterdir())
    assert [f.name for f in folders] == [TINY.key()]  # the loser's temporary folder is gone
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert set(manifest["files"]) == {"audio.npy", "index.json"}


def test_without_espeak_using_the_corpus_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DYN_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    assert not speech.loader_available()
    hint = r"pip install 'dyn\[speech\]'"
    with pytest.raises(ValueError, match=hint):
        load_corpus(TINY)
    with pytest.raises(ValueError, match=hint):
        check_data("speech")
    assert not list(tmp_path.rglob("*.npy"))


def test_bad_corpus_sizes_are_rejected():
    with pytest.raises(ValueError, match="2 held-out speakers"):
        CorpusConfig(speakers=3, held_out=1).check()
    with pytest.raises(ValueError, match="min_words"):
        CorpusConfig(min_words=5, max_words=2).check()


def test_trainer_batches_on_speech_are_a_pure_function_of_the_step(corpus, monkeypatch):
    from dynamics.tasks.separation.train import SeparationTask, TaskOptions

    monkeypatch.setattr(speech, "load_corpus", lambda config=None: corpus)
    check_data("speech")
    train, held_out = datasets("speech", 0, 1024, 16, 4)
    assert isinstance(train, SpeechMixtures) and (len(train), len(held_out)) == (16, 4)
    opts = TaskOptions(
        data="speech", hidden=8, layers=1, batch_size=2, n_samples=1024, train_mixtures=16, eval_mixtures=4
    )
    a, b = SeparationTask(opts), SeparationTask(opts)
    for t in (1, 9):  # 9 is in the second epoch
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.batch(t), b.batch(t)))
    assert not np.allclose(a.batch(1)[2].numpy(), a.batch(2)[2].numpy())
    scores = a.evaluate()
    assert np.isfinite(scores["si_sdr"]) and scores == b.evaluate()
