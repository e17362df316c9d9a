"""The built-in task: data, loss and SI-SDR against direct numpy computations."""

import itertools
import shutil

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from dynamics.tasks.separation import (
    MaskInferenceNet,
    Stft,
    SyntheticMixtures,
    Wsj0Mix,
    mask_inference_loss,
    pit_si_sdr,
    si_sdr,
)
from dynamics.tasks.separation.data import Libri2Mix, check_data, datasets, folder_splits, read_wav, wsj0_splits


def _np_si_sdr(est, ref):
    est, ref = est - est.mean(), ref - ref.mean()
    target = (est @ ref) / (ref @ ref) * ref
    return 10 * np.log10((target @ target) / ((est - target) @ (est - target)))


def test_si_sdr_matches_numpy_and_is_scale_invariant():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 800))
    est = ref + 0.3 * rng.standard_normal((4, 800)) + 0.1
    mine = si_sdr(torch.from_numpy(est), torch.from_numpy(ref)).numpy()
    assert mine == pytest.approx([_np_si_sdr(e, r) for e, r in zip(est, ref)], rel=1e-9)
    scaled = si_sdr(torch.from_numpy(est * 7.5), torch.from_numpy(ref)).numpy()
    assert scaled == pytest.approx(mine, rel=1e-9)


def test_pit_si_sdr_picks_the_best_assignment():
    rng = np.random.default_rng(1)
    refs = rng.standard_normal((3, 2, 500))
    ests = refs[:, ::-1] + 0.2 * rng.standard_normal((3, 2, 500))  # swapped order
    got = pit_si_sdr(torch.from_numpy(ests.copy()), torch.from_numpy(refs)).numpy()
    expected = [
        max(np.mean([_np_si_sdr(e[i], r[p[i]]) for i in range(2)]) for p in itertools.permutations(range(2)))
        for e, r in zip(ests, refs)
    ]
    assert got == pytest.approx(expected, rel=1e-9)
    assert min(got) > 10  # the swap was undone


def test_mask_inference_loss_matches_a_direct_formula():
    # paper eq. 4, per item: min over permutations of mean |M_i|X| - T_0^|X|(|S_j| cos(dtheta))|
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 5, 7, dtype=torch.complex128, generator=g)
    src = torch.randn(3, 2, 5, 7, dtype=torch.complex128, generator=g)
    masks = torch.rand(3, 2, 5, 7, dtype=torch.float64, generator=g)
    got = mask_inference_loss(masks, mix, src).item()
    per_item = []
    for b in range(3):
        X, S, M = mix[b].numpy(), src[b].numpy(), masks[b].numpy()
        best = np.inf
        for perm in itertools.permutations(range(2)):
            total = 0.0
            for i in range(2):
                s = S[perm[i]]
                target = np.clip(np.abs(s) * np.cos(np.angle(X) - np.angle(s)), 0, np.abs(X))
                total += np.abs(M[i] * np.abs(X) - target).mean()
            best = min(best, total / 2)
        per_item.append(best)
    assert got == pytest.approx(np.mean(per_item), rel=1e-12)


def test_network_gradients_are_finite_and_masks_in_0_1():
    net = MaskInferenceNet(hidden=8, layers=2)
    stft = Stft()
    data = SyntheticMixtures(seed=0, count=2, n_samples=2048)
    mix = torch.from_numpy(np.stack([data[i][0] for i in range(2)]))
    src = torch.from_numpy(np.stack([data[i][1] for i in range(2)]))
    spec = stft(mix)
    assert spec.shape == (2, 2048 // 64 + 1, 129)
    masks = net(spec.abs())
    assert masks.shape == (2, 2, spec.shape[1], 129) and 0 <= masks.min() and masks.max() <= 1
    loss = mask_inference_loss(masks, spec, stft(src))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_stft_round_trip_with_sqrt_hann():
    stft = Stft()
    wav = torch.randn(2, 4096, dtype=torch.float64)
    assert torch.allclose(stft.inverse(stft(wav), 4096), wav, atol=1e-10)


def test_synthetic_mixtures_are_deterministic_and_splits_disjoint():
    a = SyntheticMixtures(seed=3, count=4, n_samples=1024)
    b = SyntheticMixtures(seed=3, count=4, n_samples=1024)
    held_out = SyntheticMixtures(seed=3, count=4, n_samples=1024, split="eval")
    assert np.array_equal(a.mixtures, b.mixtures)
    assert np.allclose(a.mixtures, a.sources.sum(axis=1), atol=1e-6)
    assert not any(np.allclose(x, y) for x in a.mixtures for y in held_out.mixtures)


def _write_tree(root, names, n=3000, sr=8000, mix_dir="mix", seed=0):
    rng = np.random.default_rng(seed)
    truth = {}
    for name in names:
        s = (rng.uniform(-0.5, 0.5, size=(2, n)) * 32767).astype(np.int16)
        mix = (s.astype(np.int32).sum(0) // 2).astype(np.int16)
        for sub, data in (("s1", s[0]), ("s2", s[1]), (mix_dir, mix)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            wavfile.write(root / sub / name, sr, data)
        truth[name] = (mix, s)
    return truth


def test_wsj0_2mix_loader_reads_the_layout(tmp_path):
    truth = _write_tree(tmp_path, ["a.wav", "b.wav", "c.wav"])
    data = Wsj0Mix(tmp_path, n_samples=2000)
    assert data.names == ["a.wav", "b.wav", "c.wav"]
    mix, sources = data[1]
    assert np.allclose(mix, truth["b.wav"][0] / 32767.0)
    assert np.allclose(sources, truth["b.wav"][1] / 32767.0)
    seg_mix, seg_src = data.segment(0, np.random.default_rng(0))
    assert seg_mix.shape == (2000,) and seg_src.shape == (2, 2000)
    padded = Wsj0Mix(tmp_path, n_samples=4000).segment(0, np.random.default_rng(0))[0]
    assert padded.shape == (4000,) and np.all(padded[3000:] == 0)
    train, held_out = wsj0_splits(tmp_path, 2000)
    assert set(train.names).isdisjoint(held_out.names) and len(train) + len(held_out) == 3


def test_wsj0_2mix_loader_rejects_a_folder_without_the_layout(tmp_path):
    (tmp_path / "mix").mkdir()
    with pytest.raises(ValueError, match="no s1/"):
        Wsj0Mix(tmp_path)


def test_data_none_and_synthetic_are_the_same_synthetic_mixtures():
    old, keyword = datasets(None, 2, 512, 3, 2), datasets("synthetic", 2, 512, 3, 2)
    direct = SyntheticMixtures(2, 3, 512, "train"), SyntheticMixtures(2, 2, 512, "eval")
    for a, b, c in zip(old, keyword, direct):
        assert np.array_equal(a.mixtures, c.mixtures) and np.array_equal(b.sources, c.sources)
    check_data(None)
    check_data("synthetic")


def test_libri2mix_layout_trains_on_every_train_split_and_holds_out_dev(tmp_path):
    truth = {}
    for k, split in enumerate(["train-100", "train-360", "dev", "test"]):
        names = [f"{split}-{i}.wav" for i in range(2)]
        truth.update(_write_tree(tmp_path / split, names, n=2500, mix_dir="mix_clean", seed=k))
    check_data(str(tmp_path))
    train, held_out = datasets(str(tmp_path), 0, 2000, 8, 8)
    assert isinstance(train, Libri2Mix) and isinstance(held_out, Libri2Mix)
    assert train.names == ["train-100-0.wav", "train-100-1.wav", "train-360-0.wav", "train-360-1.wav"]
    assert held_out.names == ["dev-0.wav", "dev-1.wav"]
    for data in (train, held_out):
        for i, name in enumerate(data.names):
            mix, sources = data[i]
            assert np.allclose(mix, truth[name][0] / 32767.0) and np.allclose(sources, truth[name][1] / 32767.0)
    # without dev/, test/ is held out; a split folder on its own holds out its last files
    shutil.rmtree(tmp_path / "dev")
    assert folder_splits(tmp_path, 2000)[1].names == ["test-0.wav", "test-1.wav"]
    train, held_out = folder_splits(tmp_path / "train-360", 2000)
    assert train.names == ["train-360-0.wav"] and held_out.names == ["train-360-1.wav"]
    check_data(str(tmp_path / "train-360"))


def test_wsj0_2mix_tr_tt_layout(tmp_path):
    _write_tree(tmp_path / "tr", ["a.wav", "b.wav"])
    _write_tree(tmp_path / "tt", ["c.wav"])
    (tmp_path / "cv").mkdir()  # the validation split is not used
    check_data(str(tmp_path))
    train, held_out = datasets(str(tmp_path), 0, 1000, 8, 8)
    assert isinstance(train, Wsj0Mix) and (train.names, held_out.names) == (["a.wav", "b.wav"], ["c.wav"])


def test_read_wav_scales_each_sample_format(tmp_path):
    pcm16 = np.array([0, 32767, -32767, 16384], dtype=np.int16)
    pcm8 = np.array([128, 255, 1, 192], dtype=np.uint8)
    floats = np.array([0.0, 1.0, -1.0, 0.5], dtype=np.float32)
    for name, data in (("a.wav", pcm16), ("b.wav", pcm8), ("c.wav", floats)):
        wavfile.write(tmp_path / name, 8000, data)
    assert np.allclose(read_wav(tmp_path / "a.wav"), [0, 1, -1, 16384 / 32767])
    assert np.allclose(read_wav(tmp_path / "b.wav"), [0, 127 / 128, -127 / 128, 0.5])
    assert np.array_equal(read_wav(tmp_path / "c.wav"), floats)
    wavfile.write(tmp_path / "d.wav", 8000, pcm16[:, None])  # one channel, stored as (n, 1)
    assert read_wav(tmp_path / "d.wav").shape == (4,)


def _bad(kind, root):
    """Write a tree with one flaw; return the message check_data must give."""
    good = np.zeros(800, dtype=np.int16) + 100
    if kind == "missing folder":
        return "no such data folder", root / "nowhere"
    if kind == "no layout":
        (root / "audio").mkdir()
        return "neither a WSJ0-2mix folder", root
    if kind == "no s1":
        _write_tree(root, ["a.wav"], n=800)
        shutil.rmtree(root / "s1")
        return "not a WSJ0-2mix folder: no s1/", root
    if kind == "no wavs":
        for sub in ("mix", "s1", "s2"):
            (root / sub).mkdir()
        return r"mix holds no \.wav files", root
    if kind == "unpaired":
        _write_tree(root, ["a.wav"], n=800)
        (root / "s2" / "a.wav").unlink()
        return "a.wav is in mix/ but not in s2/", root
    if kind == "libri dev without s2":
        _write_tree(root / "train-100", ["a.wav"], n=800, mix_dir="mix_clean")
        _write_tree(root / "dev", ["b.wav"], n=800, mix_dir="mix_clean")
        shutil.rmtree(root / "dev" / "s2")
        return "dev is not a Libri2Mix folder: no s2/", root
    _write_tree(root, ["a.wav"], n=800)
    target = root / "s1" / "a.wav"
    if kind == "16 kHz":
        wavfile.write(target, 16000, good)
        return r"s1/a.wav: sample rate 16000 Hz, expected 8000", root
    if kind == "stereo":
        wavfile.write(target, 8000, np.stack([good, good], axis=1))
        return r"s1/a.wav: 2 channels, expected a mono file", root
    if kind == "empty":
        wavfile.write(target, 8000, np.zeros(0, dtype=np.int16))
        return r"s1/a.wav: no samples", root
    if kind == "nan":
        wavfile.write(target, 8000, np.array([0.1, np.nan, 0.2] * 300, dtype=np.float32))
        return r"s1/a.wav: holds NaN or infinite samples", root
    if kind == "not a wav":
        target.write_bytes(b"this is not audio")
        return r"s1/a.wav: not a readable wav file", root
    if kind == "short source":
        wavfile.write(target, 8000, good[:500])
        return r"s1/a.wav: 500 samples, shorter than its mixture's 800", root
    raise AssertionError(kind)


BAD = [
    "missing folder",
    "no layout",
    "no s1",
    "no wavs",
    "unpaired",
    "libri dev without s2",
    "16 kHz",
    "stereo",
    "empty",
    "nan",
    "not a wav",
    "short source",
]


@pytest.mark.parametrize("kind", BAD)
def test_check_data_rejects_each_bad_folder_in_one_line(tmp_path, kind):
    message, root = _bad(kind, tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        check_data(str(root))
    assert "\n" not in str(err.value)
    if kind not in ("missing folder", "no layout", "no wavs"):
        # loading the same folder fails with the same message when the file is first read
        with pytest.raises(ValueError, match=message):
            train, held_out = datasets(str(root), 0, 400, 8, 8)
            for data in (train, held_out):
                for i in range(len(data)):
                    data[i]
