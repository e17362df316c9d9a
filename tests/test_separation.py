"""The built-in task: data, loss and SI-SDR against direct numpy computations."""

import itertools

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
from dynamics.tasks.separation.data import wsj0_splits


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


def _write_tree(root, names, n=3000, sr=8000):
    rng = np.random.default_rng(0)
    truth = {}
    for name in names:
        s = (rng.uniform(-0.5, 0.5, size=(2, n)) * 32767).astype(np.int16)
        mix = (s.astype(np.int32).sum(0) // 2).astype(np.int16)
        for sub, data in (("s1", s[0]), ("s2", s[1]), ("mix", mix)):
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
