"""The paper's five losses (eqs. 4-8), their networks and k-means, against direct slow formulas."""

import itertools

import numpy as np
import pytest
import torch

from dynamics.tasks.separation.data import SyntheticMixtures
from dynamics.tasks.separation.kmeans import kmeans, kmeans_masks
from dynamics.tasks.separation.losses import (
    LOSS_NAMES,
    chimera_loss,
    deep_clustering_loss,
    mask_inference_loss,
    mask_snr_loss,
    masked_waveforms,
    separation_loss,
    snr_loss,
    whitened_kmeans_loss,
)
from dynamics.tasks.separation.model import MaskInferenceNet, SeparationNet, Stft, estimate_sources

torch.set_num_threads(1)


def _complex(shape, g):
    return torch.randn(*shape, dtype=torch.complex128, generator=g)


def _unit_embedding(shape, g, positive=True):
    v = torch.rand(*shape, dtype=torch.float64, generator=g) if positive else torch.randn(*shape, generator=g).double()
    return torch.nn.functional.normalize(v, dim=-1)


def _one_hot(src):
    """numpy (C, T, F) complex -> (T*F, C) one-hot of the dominant source."""
    dominant = np.abs(src).argmax(axis=0).reshape(-1)
    return np.eye(src.shape[0])[dominant]


def test_deep_clustering_loss_matches_the_explicit_affinity_form():
    g = torch.Generator().manual_seed(0)
    mix, src = _complex((3, 4, 6), g), _complex((3, 2, 4, 6), g)
    for positive in (True, False):
        emb = _unit_embedding((3, 4, 6, 5), g, positive)
        got = deep_clustering_loss(emb, mix, src).item()
        per_item = []
        for b in range(3):
            v = emb[b].numpy().reshape(-1, 5)
            y = _one_hot(src[b].numpy())
            w = np.abs(mix[b].numpy()).reshape(-1)
            root_w = np.diag(np.sqrt(w / w.sum()))
            diff = root_w @ (v @ v.T - y @ y.T) @ root_w  # the (TF x TF) affinities, formed explicitly
            per_item.append((diff**2).sum())
        assert got == pytest.approx(np.mean(per_item), rel=1e-10)
        if positive:  # magnitude-ratio weights: non-negative unit embeddings give a loss in [0, 1]
            assert 0 <= got <= 1


def _np_wkm(v, y):
    d = v.shape[1]
    return d - np.trace(np.linalg.inv(v.T @ v) @ v.T @ y @ np.linalg.pinv(y.T @ y) @ y.T @ v)


def test_whitened_kmeans_loss_matches_the_trace_formula():
    g = torch.Generator().manual_seed(1)
    mix, src = _complex((3, 5, 6), g), _complex((3, 2, 5, 6), g)
    emb = _unit_embedding((3, 5, 6, 4), g)
    got = whitened_kmeans_loss(emb, mix, src).item()
    expected = np.mean([_np_wkm(emb[b].numpy().reshape(-1, 4), _one_hot(src[b].numpy())) for b in range(3)])
    assert got == pytest.approx(expected, rel=1e-9)
    assert 4 - 2 - 1e-9 <= got <= 4  # D - min(D, C) <= L_WKM <= D


def test_whitened_kmeans_loss_is_zero_for_the_perfect_embedding_and_copes_with_an_absent_source():
    g = torch.Generator().manual_seed(2)
    mix, src = _complex((2, 5, 6), g), _complex((2, 2, 5, 6), g)
    perfect = torch.nn.functional.one_hot(src.abs().argmax(dim=1), 2).double()  # V = Y, D = C = 2
    assert abs(whitened_kmeans_loss(perfect, mix, src).item()) < 1e-8
    silent = src.clone()
    silent[:, 1] *= 1e-3  # source 1 dominant nowhere: Y^T Y is singular
    emb = _unit_embedding((2, 5, 6, 3), g)
    got = whitened_kmeans_loss(emb, mix, silent).item()
    expected = np.mean([_np_wkm(emb[b].numpy().reshape(-1, 3), _one_hot(silent[b].numpy())) for b in range(2)])
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


def _np_snr_loss(est, ref):
    return -10 * np.log10((ref @ ref) / ((ref - est) @ (ref - est)))


def test_snr_loss_matches_numpy_and_undoes_a_swap():
    rng = np.random.default_rng(3)
    refs = rng.standard_normal((3, 2, 400))
    ests = refs[:, ::-1] + 0.1 * rng.standard_normal((3, 2, 400))  # swapped order
    got = snr_loss(torch.from_numpy(ests.copy()), torch.from_numpy(refs)).item()
    expected = np.mean(
        [
            min(np.mean([_np_snr_loss(e[i], r[p[i]]) for i in range(2)]) for p in itertools.permutations(range(2)))
            for e, r in zip(ests, refs)
        ]
    )
    assert got == pytest.approx(expected, rel=1e-9)
    assert got < -15  # about -20 dB: the swapped assignment was chosen


def test_snr_loss_of_masks_goes_through_the_inverse_stft_with_the_mixture_phase():
    stft = Stft()
    g = torch.Generator().manual_seed(4)
    src = torch.randn(2, 2, 1024, dtype=torch.float64, generator=g)
    mix_spec, src_spec = stft(src.sum(1)), stft(src)
    masks = torch.rand(2, 2, *mix_spec.shape[1:], dtype=torch.float64, generator=g)
    direct = torch.istft(
        (masks * mix_spec.unsqueeze(1)).reshape(4, *mix_spec.shape[1:]).transpose(1, 2),
        256,
        64,
        window=stft.window,
        length=1024,
    ).reshape(2, 2, 1024)
    assert torch.allclose(masked_waveforms(masks, mix_spec, stft, 1024), direct, atol=1e-12)
    assert mask_snr_loss(masks, mix_spec, src, stft).item() == pytest.approx(snr_loss(direct, src).item(), rel=1e-10)
    ones = torch.ones_like(masks)  # all-pass masks give the mixture back
    assert torch.allclose(masked_waveforms(ones, mix_spec, stft, 1024)[:, 0], src.sum(1), atol=1e-10)
    outputs = {"masks": masks}
    assert separation_loss("snr", outputs, mix_spec, src_spec, src, stft).item() == pytest.approx(
        snr_loss(direct, src).item(), rel=1e-10
    )


def test_chimera_is_three_quarters_mi_plus_a_quarter_wkm():
    g = torch.Generator().manual_seed(5)
    mix, src = _complex((2, 5, 6), g), _complex((2, 2, 5, 6), g)
    masks = torch.rand(2, 2, 5, 6, dtype=torch.float64, generator=g)
    emb = _unit_embedding((2, 5, 6, 4), g)
    expected = 0.75 * mask_inference_loss(masks, mix, src) + 0.25 * whitened_kmeans_loss(emb, mix, src)
    assert chimera_loss(masks, emb, mix, src).item() == pytest.approx(expected.item(), rel=1e-12)
    outputs = {"masks": masks, "embedding": emb}
    assert separation_loss("chimera", outputs, mix, src, None, None).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.fixture(scope="module")
def batch():
    stft = Stft()
    data = SyntheticMixtures(seed=0, count=2, n_samples=1024)
    mix = torch.from_numpy(data.mixtures)
    src = torch.from_numpy(data.sources)
    return stft, mix, src, stft(mix), stft(src)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_network_trains_and_separates(name, batch):
    stft, mix, src, mix_spec, src_spec = batch
    torch.manual_seed(0)
    net = SeparationNet(name, hidden=8, layers=2, embedding_dim=6)
    outputs = net(mix_spec.abs())
    t = mix_spec.shape[1]
    if "masks" in outputs:
        assert outputs["masks"].shape == (2, 2, t, 129)
    if "embedding" in outputs:
        emb = outputs["embedding"]
        assert emb.shape == (2, t, 129, 6) and emb.min() >= 0
        assert torch.allclose(emb.norm(dim=-1), torch.ones(()), atol=1e-5)
    loss = separation_loss(name, outputs, mix_spec, src_spec, src, stft)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    with torch.no_grad():
        wav = estimate_sources(name, net(mix_spec.abs()), mix_spec, stft, 1024)
    assert wav.shape == (2, 2, 1024) and torch.isfinite(wav).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_scaling_the_loss_scales_the_gradients(name, batch):
    # paper footnote 2: grad(a f) = a grad(f); float64 so the check is exact up to rounding
    stft, mix, src, mix_spec, src_spec = batch
    torch.manual_seed(1)
    net = SeparationNet(name, hidden=6, layers=1, embedding_dim=4).double()
    grads = []
    for a in (1.0, 7.0):
        net.zero_grad()
        loss = separation_loss(name, net(mix_spec.abs().double()), mix_spec, src_spec, src.double(), stft)
        (a * loss).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g1, g7 in zip(*grads):
        assert torch.allclose(g7, 7.0 * g1, rtol=1e-9, atol=1e-12 * g1.abs().max().item())


def test_separation_net_mi_is_mask_inference_net():
    torch.manual_seed(3)
    old = MaskInferenceNet(hidden=8, layers=2)
    torch.manual_seed(3)
    new = SeparationNet("mi", hidden=8, layers=2)
    assert list(old.state_dict()) == list(new.state_dict())
    mag = torch.rand(2, 10, 129)
    assert torch.equal(old(mag), new(mag)["masks"])
    with pytest.raises(ValueError, match="unknown loss"):
        SeparationNet("l2")


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(6)
    b, n, d = 4, 300, 8
    centres = torch.nn.functional.normalize(torch.rand(b, 2, d, generator=g), dim=-1)
    truth = torch.randint(0, 2, (b, n), generator=g)
    points = centres[torch.arange(b)[:, None], truth] + 0.03 * torch.randn(b, n, d, generator=g)
    weights = torch.rand(b, n, generator=g)
    for w in (None, weights):
        labels = kmeans(points, 2, w)
        for got, want in zip(labels, truth):
            assert torch.equal(got, want) or torch.equal(got, 1 - want)
    masks = kmeans_masks(points.view(b, 20, 15, d), weights.view(b, 20, 15))
    assert masks.shape == (b, 2, 20, 15) and torch.equal(masks.sum(1), torch.ones(b, 20, 15))
    assert torch.equal(kmeans(points, 2, weights), kmeans(points, 2, weights))  # deterministic
