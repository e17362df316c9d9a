"""Two-source mixtures: synthetic speech-like ones made from a seed, or WSJ0-2mix from disk.

A dataset gives ``(mixture, sources)`` as float32 arrays of shapes (n,) and (2, n).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 8000


def synth_source(rng: np.random.Generator, n: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A speech-like signal: harmonics of a moving pitch under moving formant-like peaks,
    amplitude-modulated at a syllable rate, with a little breath noise."""
    t = np.arange(n) / sr
    f0 = rng.uniform(90.0, 250.0)
    glide = rng.uniform(-0.3, 0.3) * t / max(t[-1], 1e-9)
    vibrato = 0.06 * np.sin(2 * np.pi * rng.uniform(2.0, 6.0) * t + rng.uniform(0, 2 * np.pi))
    pitch = f0 * (1.0 + glide + vibrato)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    # two or three formants drifting between vowel-like positions
    n_formants = int(rng.integers(2, 4))
    centres = np.stack(
        [
            np.linspace(rng.uniform(lo, hi), rng.uniform(lo, hi), n)
            for lo, hi in [(250, 900), (900, 2300), (2300, 3400)][:n_formants]
        ]
    )
    widths = rng.uniform(80.0, 250.0, size=(n_formants, 1))
    harmonics = np.arange(1, int(3800.0 / (f0 * 1.4)) + 1)[:, None]
    freqs = harmonics * pitch[None, :]
    envelope = np.zeros_like(freqs)
    for c, w in zip(centres, widths):
        envelope += np.exp(-0.5 * ((freqs - c[None, :]) / w) ** 2)
    envelope += 0.05 / harmonics  # spectral tilt between formants
    envelope *= freqs < 3900.0
    voiced = (envelope * np.sin(harmonics * phase[None, :])).sum(axis=0)
    rate = rng.uniform(3.0, 6.0)  # syllables per second
    syllables = np.clip(np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)), 0.0, None) ** 0.7
    signal = voiced * (0.15 + syllables) + 0.02 * rng.standard_normal(n) * syllables
    return (signal / (np.std(signal) + 1e-8)).astype(np.float32)


class SyntheticMixtures:
    """``count`` deterministic two-source mixtures; item i depends only on (seed, split, i).

    Training and held-out sets use different ``split`` values, so their random streams
    are disjoint. Sources are mixed at a relative level drawn from [-5, 5] dB.

    Example::

        train = SyntheticMixtures(seed=0, count=512)
        mixture, sources = train[3]
    """

    def __init__(self, seed: int, count: int, n_samples: int = 4096, split: str = "train"):
        self.seed, self.count, self.n_samples, self.split = seed, count, n_samples, split
        stream = {"train": 0, "eval": 1}[split]
        mixtures, sources = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, stream, i])
            pair = np.stack([synth_source(rng, n_samples) for _ in range(2)])
            pair[1] *= 10.0 ** (rng.uniform(-5.0, 5.0) / 20.0)
            scale = 0.1 / (np.abs(pair.sum(axis=0)).max() + 1e-8)
            sources.append(pair * scale)
            mixtures.append(sources[-1].sum(axis=0))
        self.mixtures = np.stack(mixtures).astype(np.float32)
        self.sources = np.stack(sources).astype(np.float32)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.mixtures[i], self.sources[i]

    def segment(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self[i]


def _read_wav(path: Path) -> np.ndarray:
    from scipy.io import wavfile

    sr, data = wavfile.read(path)
    if sr != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {sr}, expected {SAMPLE_RATE}")
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / np.iinfo(data.dtype).max
    if data.ndim > 1:
        data = data[:, 0]
    return data.astype(np.float32)


class Wsj0Mix:
    """The WSJ0-2mix layout: ``DIR/mix``, ``DIR/s1``, ``DIR/s2`` holding wav files of the same names.

    Files are read when first used. ``segment(i, rng)`` cuts ``n_samples`` at a random
    offset (zero-padding short files), as the paper's training does.

    Example::

        data = Wsj0Mix("wsj0-2mix/wav8k/min/tr", n_samples=4096)
        mixture, sources = data[0]
    """

    def __init__(self, root: str | Path, n_samples: int = 4096, names: list[str] | None = None):
        self.root = Path(root)
        for sub in ("mix", "s1", "s2"):
            if not (self.root / sub).is_dir():
                raise ValueError(f"{self.root} is not a WSJ0-2mix folder: no {sub}/ inside")
        self.names = names if names is not None else sorted(p.name for p in (self.root / "mix").glob("*.wav"))
        if not self.names:
            raise ValueError(f"{self.root}/mix holds no .wav files")
        missing = [n for n in self.names if not (self.root / "s1" / n).exists() or not (self.root / "s2" / n).exists()]
        if missing:
            raise ValueError(f"{self.root}: {missing[0]} is in mix/ but not in both s1/ and s2/")
        self.n_samples = n_samples
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            name = self.names[i]
            mix = _read_wav(self.root / "mix" / name)
            sources = np.stack([_read_wav(self.root / s / name)[: len(mix)] for s in ("s1", "s2")])
            self._cache[i] = (mix, sources)
        return self._cache[i]

    def segment(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mix, sources = self[i]
        n = self.n_samples
        if len(mix) >= n:
            start = int(rng.integers(0, len(mix) - n + 1))
            return mix[start : start + n], sources[:, start : start + n]
        pad = n - len(mix)
        return np.pad(mix, (0, pad)), np.pad(sources, ((0, 0), (0, pad)))


def wsj0_splits(root: str | Path, n_samples: int, held_out: float = 0.05) -> tuple[Wsj0Mix, Wsj0Mix]:
    """Training and held-out sets: ``tr``/``tt`` subfolders if present, else the last 5% of files."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such data folder")
    if (root / "tr").is_dir() and (root / "tt").is_dir():
        return Wsj0Mix(root / "tr", n_samples), Wsj0Mix(root / "tt", n_samples)
    full = Wsj0Mix(root, n_samples)
    cut = max(1, int(round(len(full) * held_out))) if len(full) > 1 else 0
    train_names, eval_names = full.names[: len(full) - cut], full.names[len(full) - cut :] or full.names
    return Wsj0Mix(root, n_samples, train_names), Wsj0Mix(root, n_samples, eval_names)


def datasets(data: str | None, seed: int, n_samples: int, train_mixtures: int, eval_mixtures: int):
    """The training and held-out sets that ``data`` names: None for synthetic mixtures, else a folder."""
    if data:
        return wsj0_splits(data, n_samples)
    return (
        SyntheticMixtures(seed, train_mixtures, n_samples, "train"),
        SyntheticMixtures(seed, eval_mixtures, n_samples, "eval"),
    )
