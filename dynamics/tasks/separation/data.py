"""Two-source mixtures: synthetic speech-like ones made from a seed, the eSpeak NG corpus, or wav folders
(WSJ0-2mix, Libri2Mix) from disk.

A dataset gives ``(mixture, sources)`` as float32 arrays of shapes (n,) and (2, n).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from dynamics.tasks.separation.errors import DataError

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


def read_wav(path: str | Path) -> np.ndarray:
    """A mono 8 kHz wav file as float32 in [-1, 1].

    Raises ValueError naming the file if it is unreadable, empty, not 8 kHz, has more than one
    channel (the separation sets are mono; a stereo file means a wrong folder), or holds NaN or inf.
    """
    from scipy.io import wavfile

    path = Path(path)
    try:
        sr, data = wavfile.read(path)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable wav file ({e})") from e
    if sr != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {sr} Hz, expected {SAMPLE_RATE} (resample the data set to 8 kHz)")
    if data.ndim > 1 and data.shape[1] != 1:
        raise DataError(f"{path}: {data.shape[1]} channels, expected a mono file")
    data = data.reshape(len(data))
    if len(data) == 0:
        raise DataError(f"{path}: no samples")
    if data.dtype.kind == "u":  # 8-bit wav is unsigned, centred on 128
        data = (data.astype(np.float32) - 128) / 128
    elif data.dtype.kind == "i":
        data = data.astype(np.float32) / np.iinfo(data.dtype).max
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: holds NaN or infinite samples")
    return data


class MixFolder:
    """Mixtures stored as wav files: ``mix`` and the two sources under the same file name.

    Files are read when first used. ``segment(i, rng)`` cuts ``n_samples`` at a random
    offset (zero-padding short files), as the paper's training does.
    """

    MIX = "mix"

    def __init__(self, root: str | Path | list, n_samples: int = 4096, names: list[str] | None = None):
        self.roots = [Path(r) for r in root] if isinstance(root, list) else [Path(root)]
        self.root = self.roots[0]
        self.items: list[tuple[Path, str]] = []
        for r in self.roots:
            _check_subfolders(r, self.MIX)
            found = names if names is not None else sorted(p.name for p in (r / self.MIX).glob("*.wav"))
            self.items += [(r, n) for n in found]
        if not self.items:
            raise DataError(f"{self.roots[0] / self.MIX} holds no .wav files")
        for r, n in self.items:
            for sub in ("s1", "s2"):
                if not (r / sub / n).is_file():
                    raise DataError(f"{r}: {n} is in {self.MIX}/ but not in {sub}/")
        self.names = [n for _, n in self.items]
        self.n_samples = n_samples
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            self._cache[i] = _read_triple(*self.items[i], self.MIX)
        return self._cache[i]

    def segment(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mix, sources = self[i]
        n = self.n_samples
        if len(mix) >= n:
            start = int(rng.integers(0, len(mix) - n + 1))
            return mix[start : start + n], sources[:, start : start + n]
        pad = n - len(mix)
        return np.pad(mix, (0, pad)), np.pad(sources, ((0, 0), (0, pad)))


class Wsj0Mix(MixFolder):
    """The WSJ0-2mix layout: ``DIR/mix``, ``DIR/s1``, ``DIR/s2`` holding wav files of the same names.

    Example::

        data = Wsj0Mix("wsj0-2mix/wav8k/min/tr", n_samples=4096)
        mixture, sources = data[0]
    """


class Libri2Mix(MixFolder):
    """A Libri2Mix split folder: ``mix_clean``, ``s1``, ``s2`` holding wav files of the same names.

    ``root`` may be a list of split folders (train-100 and train-360) read as one set.

    Example::

        data = Libri2Mix("Libri2Mix/wav8k/min/dev", n_samples=4096)
    """

    MIX = "mix_clean"


def _check_subfolders(root: Path, mix: str) -> None:
    kind = "Libri2Mix" if mix == "mix_clean" else "WSJ0-2mix"
    for sub in (mix, "s1", "s2"):
        if not (root / sub).is_dir():
            raise DataError(f"{root} is not a {kind} folder: no {sub}/ inside")


def _read_triple(root: Path, name: str, mix_dir: str) -> tuple[np.ndarray, np.ndarray]:
    mix = read_wav(root / mix_dir / name)
    sources = []
    for s in ("s1", "s2"):
        x = read_wav(root / s / name)
        if len(x) < len(mix):
            raise DataError(f"{root / s / name}: {len(x)} samples, shorter than its mixture's {len(mix)}")
        sources.append(x[: len(mix)])
    return mix, np.stack(sources)


def _layout(root: Path) -> tuple[type[MixFolder], list[Path], list[Path] | None]:
    """The kind of folder, its training folders, and its held-out folders (None: cut from training)."""
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    if (root / "tr").is_dir() and (root / "tt").is_dir():
        return Wsj0Mix, [root / "tr"], [root / "tt"]
    if (root / "mix").is_dir():
        return Wsj0Mix, [root], None
    if (root / "mix_clean").is_dir():
        return Libri2Mix, [root], None
    train = sorted(p for p in root.glob("train-*") if (p / "mix_clean").is_dir())
    held_out = [p for p in (root / "dev", root / "test") if (p / "mix_clean").is_dir()][:1]
    if train:
        return Libri2Mix, train, held_out or None
    raise DataError(
        f"{root}: neither a WSJ0-2mix folder (mix/, s1/, s2/, or tr/ and tt/ holding them) "
        "nor a Libri2Mix one (mix_clean/, s1/, s2/, or train-*/ and dev/ or test/ holding them)"
    )


def folder_splits(root: str | Path, n_samples: int, held_out: float = 0.05) -> tuple[MixFolder, MixFolder]:
    """Training and held-out sets of a WSJ0-2mix or Libri2Mix folder.

    WSJ0-2mix: ``tr``/``tt`` if present. Libri2Mix: every ``train-*`` split for training,
    ``dev`` (else ``test``) held out. A single split folder: its last 5% of files held out.
    """
    kind, train, evals = _layout(Path(root))
    if evals is not None:
        return kind(train, n_samples), kind(evals, n_samples)
    full = kind(train, n_samples)
    cut = max(1, int(round(len(full) * held_out))) if len(full) > 1 else 0
    train_items, eval_items = full.items[: len(full) - cut], full.items[len(full) - cut :] or full.items
    return _subset(full, train_items), _subset(full, eval_items)


def _subset(full: MixFolder, items: list[tuple[Path, str]]) -> MixFolder:
    part = copy.copy(full)
    part.items, part.names, part._cache = items, [n for _, n in items], {}
    return part


def wsj0_splits(root: str | Path, n_samples: int, held_out: float = 0.05) -> tuple[MixFolder, MixFolder]:
    """Training and held-out sets of a WSJ0-2mix (or Libri2Mix) folder; see ``folder_splits``."""
    return folder_splits(root, n_samples, held_out)


def check_data(data: str | None) -> None:
    """Check a ``--data`` value cheaply, before anything is written; ValueError with one line if it is unusable.

    None or "synthetic": always fine. "speech": eSpeak NG is installed (or the corpus is cached).
    A folder: a WSJ0-2mix or Libri2Mix layout whose folders each hold wav files, the first of
    which (mixture and both sources) reads as non-empty 8 kHz mono.
    """
    if data is None or data == "synthetic":
        return
    if data == "speech":
        from dynamics.tasks.separation import speech

        if not speech.loader_available() and not (speech.corpus_dir(speech.CorpusConfig()) / "manifest.json").exists():
            raise DataError(speech.INSTALL_HINT)
        return
    kind, train, evals = _layout(Path(data))
    for folder in train + (evals or []):
        _check_subfolders(folder, kind.MIX)
        first = min((p.name for p in (folder / kind.MIX).glob("*.wav")), default=None)
        if first is None:
            raise DataError(f"{folder / kind.MIX} holds no .wav files")
        for sub in ("s1", "s2"):
            if not (folder / sub / first).is_file():
                raise DataError(f"{folder}: {first} is in {kind.MIX}/ but not in {sub}/")
        _read_triple(folder, first, kind.MIX)


def datasets(data: str | None, seed: int, n_samples: int, train_mixtures: int, eval_mixtures: int):
    """The training and held-out sets that ``data`` names.

    None or "synthetic": synthetic mixtures (``train_mixtures`` and ``eval_mixtures`` of them);
    "speech": the built-in eSpeak NG corpus, dynamically mixed (a nominal epoch of
    ``train_mixtures``, ``eval_mixtures`` held out); otherwise a WSJ0-2mix or Libri2Mix folder
    (a folder named like a keyword is reached as ``./speech``).
    """
    if data is None or data == "synthetic":
        return (
            SyntheticMixtures(seed, train_mixtures, n_samples, "train"),
            SyntheticMixtures(seed, eval_mixtures, n_samples, "eval"),
        )
    if data == "speech":
        from dynamics.tasks.separation.speech import speech_splits

        return speech_splits(seed, n_samples, train_mixtures, eval_mixtures)
    return folder_splits(data, n_samples)
