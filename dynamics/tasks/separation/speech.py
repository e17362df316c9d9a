"""A built-in two-speaker speech corpus, synthesized with eSpeak NG, and dynamically mixed datasets on it.

The corpus is made once per machine and cached under ``$DYN_CACHE/speech-v1`` (default ``~/.cache/dyn``):
many synthetic speakers (an English accent x a voice variant x pitch, pitch range and speaking rate), each
reading sentences of common English words, resampled to 8 kHz. Training and held-out speakers are disjoint,
and no held-out speaker shares its accent-and-variant voice with a training speaker, as WSJ0-2mix keeps
its test speakers out of training.

Synthesis needs the optional ``espeakng-loader`` wheel (``pip install 'dyn[speech]'``), which bundles the
eSpeak NG library and its voices; a corpus already in the cache is read without it.

Example::

    corpus = load_corpus()
    train = SpeechMixtures(corpus, "train", count=512, n_samples=4096, seed=0)
    mixture, sources = train.segment(0, np.random.default_rng(1))
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dynamics.tasks.separation.errors import DataError

SAMPLE_RATE = 8000
VERSION = 1  # bump when synthesis changes what a plan sounds like; a plan change alone gets a new folder
INSTALL_HINT = "the built-in speech corpus needs eSpeak NG: pip install 'dyn[speech]'"

# English accents of eSpeak NG; every one reads the same English dictionary.
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
# Voice variants that sound like people (eSpeak also has whispers, robots and monsters, left out).
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "adam", "Alicia", "Andrea", "Andy", "anika", "antonio", "aunty",
    "belinda", "benjamin", "boris", "david", "ed", "edward", "gustave", "ian", "john", "linda", "max",
    "michel", "norbert", "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac",
)  # fmt: skip
_EVAL_STREAM = 11  # held-out mixture i of run seed s comes from default_rng([s, _EVAL_STREAM, i])
_FILES = ("audio.npy", "index.json")


@dataclass(frozen=True)
class CorpusConfig:
    """What defines a corpus; each distinct config has its own cache folder.

    ``seed`` fixes the speakers and sentences and is not a run's seed: every run shares one corpus.
    """

    speakers: int = 60
    held_out: int = 12
    utterances: int = 12  # per speaker
    min_words: int = 8
    max_words: int = 14
    seed: int = 0

    def check(self) -> None:
        if self.held_out < 2 or self.speakers - self.held_out < 2:
            raise ValueError(
                f"a speech corpus needs at least 2 training and 2 held-out speakers, "
                f"got {self.speakers} speakers with {self.held_out} held out"
            )
        if self.speakers > len(ACCENTS) * len(VARIANTS):
            raise ValueError(f"at most {len(ACCENTS) * len(VARIANTS)} speakers, got {self.speakers}")
        if self.utterances < 1 or not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"need utterances >= 1 and 1 <= min_words <= max_words, got {self.utterances}, "
                f"{self.min_words}, {self.max_words}"
            )

    def key(self) -> str:
        """Cache folder name: a digest of the plan, so new voices or words never reuse old audio."""
        digest = hashlib.sha256(json.dumps(plan(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.speakers}x{self.utterances}-{digest}"


def cache_root() -> Path:
    """``$DYN_CACHE`` if set, else ``~/.cache/dyn``."""
    return Path(os.environ.get("DYN_CACHE") or Path.home() / ".cache" / "dyn")


def corpus_dir(config: CorpusConfig) -> Path:
    return cache_root() / f"speech-v{VERSION}" / config.key()


def loader_available() -> bool:
    """Whether eSpeak NG (the ``espeakng-loader`` wheel) can be imported."""
    try:
        return importlib.util.find_spec("espeakng_loader") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, or a broken install
        return False


def plan(config: CorpusConfig) -> dict:
    """Speakers and sentences of the corpus: a pure function of ``config``."""
    from dynamics.tasks.separation.words import WORDS

    config.check()
    rng = np.random.default_rng([config.seed, VERSION])
    voices = [(a, v) for a in ACCENTS for v in VARIANTS]
    chosen = rng.permutation(len(voices))[: config.speakers]
    speakers = []
    for k, c in enumerate(chosen):
        accent, variant = voices[c]
        speakers.append(
            {
                "id": k,
                "voice": f"{accent}+{variant}",
                "pitch": int(rng.integers(25, 76)),
                "range": int(rng.integers(30, 91)),
                "rate": int(rng.integers(140, 201)),
                "split": "train" if k < config.speakers - config.held_out else "eval",
            }
        )
    utterances = []
    for s in speakers:
        for _ in range(config.utterances):
            n = int(rng.integers(config.min_words, config.max_words + 1))
            utterances.append({"speaker": s["id"], "text": " ".join(rng.choice(WORDS, n)) + "."})
    return {"version": VERSION, "config": asdict(config), "speakers": speakers, "utterances": utterances}


class _Espeak:
    """eSpeak NG through ctypes, synchronous, collecting 16-bit samples from the synth callback."""

    RATE, PITCH, RANGE = 1, 3, 4  # espeak_PARAMETER
    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8 = 2, 1, 1

    def __init__(self):
        import ctypes

        import espeakng_loader

        self.ct = ctypes
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint]
        lib.espeak_Synth.argtypes += [ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib = lib
        self.rate = lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialize")
        self.version = lib.espeak_Info(None).decode()
        self.variants = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
        self.chunks: list[np.ndarray] = []
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback(self._collect)  # kept alive as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if wav and n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str, pitch: int, pitch_range: int, rate: int, seed: int = 0) -> np.ndarray:
        """int16 samples at ``self.rate`` Hz; ``seed`` drives eSpeak's noise (else seeded from the clock)."""
        # eSpeak quietly ignores an unknown variant, which would merge speakers
        variant = voice.partition("+")[2]
        if variant and not (self.variants / variant).is_file():
            raise RuntimeError(f"eSpeak NG has no voice variant {variant!r}")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        for name, value in ((self.RATE, rate), (self.PITCH, pitch), (self.RANGE, pitch_range)):
            self.lib.espeak_SetParameter(name, value, 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self.chunks = []
        data = text.encode() + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, self.POS_CHARACTER, 0, self.CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"eSpeak NG failed on {text!r} (status {status})")
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def _trim(x: np.ndarray, rate: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x.astype(np.float64)) > 0.01 * np.abs(x.astype(np.float64)).max())
    margin = rate // 100
    return x[max(loud[0] - margin, 0) : loud[-1] + margin + 1]


def synthesize(plan_file: str | Path, out: str | Path) -> None:
    """Synthesize a plan (from ``plan``) into folder ``out``: audio.npy, index.json, then manifest.json.

    eSpeak NG carries state from one utterance to the next (the same text twice in one process
    sounds slightly different), so the audio depends on the whole sequence; ``build`` runs this
    in a fresh process so that the corpus is a function of its plan alone.
    """
    from math import gcd

    from scipy.signal import resample_poly

    spec = json.loads(Path(plan_file).read_text())
    engine = _Espeak()
    g = gcd(SAMPLE_RATE, engine.rate)
    pieces, index, start = [], [], 0
    speakers = {s["id"]: s for s in spec["speakers"]}
    for k, u in enumerate(spec["utterances"]):
        s = speakers[u["speaker"]]
        raw = engine.say(u["text"], s["voice"], s["pitch"], s["range"], s["rate"], seed=k)
        if not raw.any():
            raise RuntimeError(f"eSpeak NG gave silence for {u['text']!r} in voice {s['voice']}")
        y = resample_poly(_trim(raw, engine.rate).astype(np.float64), SAMPLE_RATE // g, engine.rate // g)
        y -= y.mean()  # some voices carry a DC offset, which a mask cannot separate
        pcm = np.round(y * (0.9 * 32767 / np.abs(y).max())).astype(np.int16)
        rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) / 32768)
        index.append({**u, "start": start, "length": len(pcm), "rms": rms})
        pieces.append(pcm)
        start += len(pcm)
    out = Path(out)
    np.save(out / "audio.npy", np.concatenate(pieces))
    meta = {k: v for k, v in spec.items() if k != "utterances"}
    info = {"espeak": engine.version, "sample_rate": SAMPLE_RATE}
    (out / "index.json").write_text(json.dumps({**meta, **info, "utterances": index}))
    files = {}
    for name in _FILES:
        raw_bytes = (out / name).read_bytes()
        files[name] = {"size": len(raw_bytes), "sha256": hashlib.sha256(raw_bytes).hexdigest()}
    # written last: a folder with a manifest is complete
    (out / "manifest.json").write_text(json.dumps({"version": VERSION, "files": files}, indent=1))


def _synthesize_in_child(plan_file: Path, out: Path) -> None:
    # Loads this file by path, so the child imports only numpy and scipy, not the torch-importing package.
    code = (
        "import importlib.util, sys\n"
        f"s = importlib.util.spec_from_file_location('_dyn_speech', {str(Path(__file__))!r})\n"
        "m = importlib.util.module_from_spec(s); sys.modules['_dyn_speech'] = m; s.loader.exec_module(m)\n"
        "m.synthesize(sys.argv[1], sys.argv[2])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(plan_file), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise RuntimeError(f"building the speech corpus failed: {lines[-1]}")


@dataclass
class Corpus:
    """Utterances of the speech corpus: int16 audio at 8 kHz, one speaker each."""

    audio: np.ndarray  # all utterances, end to end (int16)
    starts: np.ndarray
    lengths: np.ndarray
    rms: np.ndarray  # of each utterance, as a fraction of full scale
    speaker: np.ndarray  # speaker id of each utterance
    speakers: list[dict]  # id, voice, pitch, range, rate, split
    texts: list[str]
    path: Path
    espeak: str

    def speaker_ids(self, split: str) -> np.ndarray:
        return np.array([s["id"] for s in self.speakers if s["split"] == split])

    def utterance(self, u: int) -> np.ndarray:
        """Utterance u as float32 in [-1, 1]."""
        return self.audio[self.starts[u] : self.starts[u] + self.lengths[u]].astype(np.float32) / 32768

    @property
    def minutes(self) -> float:
        return len(self.audio) / SAMPLE_RATE / 60


def _read(folder: Path) -> Corpus:
    """The corpus in ``folder``; ValueError if anything is missing or differs from its manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        raw = {}
        for name in _FILES:
            raw[name] = (folder / name).read_bytes()
            want = manifest["files"][name]
            if len(raw[name]) != want["size"] or hashlib.sha256(raw[name]).hexdigest() != want["sha256"]:
                raise ValueError(f"{folder / name} differs from its manifest")
        index = json.loads(raw["index.json"])
        u = index["utterances"]
        return Corpus(
            audio=np.load(io.BytesIO(raw["audio.npy"])),
            starts=np.array([x["start"] for x in u], dtype=np.int64),
            lengths=np.array([x["length"] for x in u], dtype=np.int64),
            rms=np.array([x["rms"] for x in u]),
            speaker=np.array([x["speaker"] for x in u]),
            speakers=index["speakers"],
            texts=[x["text"] for x in u],
            path=folder,
            espeak=index["espeak"],
        )
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}: damaged speech corpus ({e})") from e


def _remove(folder: Path) -> None:
    # renamed away first, so no reader ever sees a half-deleted corpus
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        folder.rename(trash)
    except FileNotFoundError:
        return  # another process moved it already
    shutil.rmtree(trash, ignore_errors=True)


def build(config: CorpusConfig, final: Path) -> None:
    """Synthesize the corpus into a temporary folder beside ``final``, then rename it into place.

    If another process renamed its copy into place first, that one stays and this one is dropped:
    both were made from the same plan.
    """
    if not loader_available():
        raise DataError(INSTALL_HINT)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".*-{final.name}-*"):  # left by a killed build, after a day
        try:
            if time.time() - stale.stat().st_mtime > 86400:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
    try:
        (tmp / "plan.json").write_text(json.dumps(plan(config)))
        _synthesize_in_child(tmp / "plan.json", tmp)
        (tmp / "plan.json").unlink()
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_corpus(config: CorpusConfig | None = None) -> Corpus:
    """The corpus for ``config`` (default sizes): read from the cache, or built into it first.

    A cached corpus that differs from its manifest (a damaged or half-copied cache) is rebuilt.
    """
    config = config or CorpusConfig()
    config.check()
    final = corpus_dir(config)
    for _ in range(3):  # a concurrent process may replace the folder between our steps
        if (final / "manifest.json").exists():
            try:
                return _read(final)
            except ValueError:
                _remove(final)
        elif final.exists():
            _remove(final)  # no manifest: not something build() left
        build(config, final)
    return _read(final)


class Draw(NamedTuple):
    """One mixture: two utterances, where each one's segment starts in it, and source 2's level in dB.

    A start below zero places the utterance that many samples into the segment (zeros before it).
    """

    utterances: tuple[int, int]
    starts: tuple[int, int]
    gain_db: float


class SpeechMixtures:
    """Two-speaker mixtures of the speech corpus, as ``(mixture (n,), sources (2, n))`` float32 arrays.

    ``split="train"``: mixed dynamically. ``segment(i, rng)`` draws the two training speakers, one
    utterance of each, where each is cut, and the relative level (uniform in [-5, 5] dB) from ``rng``
    alone, so a batch is a pure function of the generators the trainer seeds by (seed, step, index);
    ``i`` only names a slot of the nominal epoch of ``count`` mixtures.

    ``split="eval"``: ``count`` fixed mixtures of held-out speakers, a function of ``seed``;
    ``segment(i, rng)`` ignores ``rng``.

    Mixtures are scaled to a peak of 0.1, as the synthetic ones.
    """

    def __init__(self, corpus: Corpus, split: str, count: int, n_samples: int = 4096, seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if count < 1 or n_samples < 1:
            raise ValueError(f"count and n_samples must be positive, got {count} and {n_samples}")
        self.corpus, self.split, self.count, self.n_samples, self.seed = corpus, split, count, n_samples, seed
        ids = corpus.speaker_ids(split)
        self.by_speaker = [np.flatnonzero(corpus.speaker == k) for k in ids]
        self.draws: list[Draw] = []
        if split == "eval":
            self.draws = [self.draw(np.random.default_rng([seed, _EVAL_STREAM, i])) for i in range(count)]
            rendered = [self.render(d) for d in self.draws]
            self.mixtures = np.stack([m for m, _ in rendered])
            self.sources = np.stack([s for _, s in rendered])

    def __len__(self) -> int:
        return self.count

    def draw(self, rng: np.random.Generator) -> Draw:
        """Two different speakers of this split, an utterance of each, their starts and the level."""
        a, b = rng.choice(len(self.by_speaker), size=2, replace=False)
        utts = [int(self.by_speaker[k][rng.integers(len(self.by_speaker[k]))]) for k in (a, b)]
        starts = []
        for u in utts:
            spare = int(self.corpus.lengths[u]) - self.n_samples
            starts.append(int(rng.integers(min(0, spare), max(0, spare) + 1)))
        return Draw((utts[0], utts[1]), (starts[0], starts[1]), float(rng.uniform(-5.0, 5.0)))

    def render(self, d: Draw) -> tuple[np.ndarray, np.ndarray]:
        n = self.n_samples
        sources = np.zeros((2, n))
        for k, (u, start) in enumerate(zip(d.utterances, d.starts)):
            x = self.corpus.utterance(u)
            lo, hi = max(start, 0), min(start + n, len(x))
            sources[k, lo - start : hi - start] = x[lo:hi] / self.corpus.rms[u]
        sources[1] *= 10.0 ** (d.gain_db / 20.0)
        sources *= 0.1 / (np.abs(sources.sum(axis=0)).max() + 1e-8)
        return sources.sum(axis=0).astype(np.float32), sources.astype(np.float32)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(f"mixture {i} of {self.count}")

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        self._check(i)
        if self.split == "eval":
            return self.mixtures[i], self.sources[i]
        return self.segment(i, np.random.default_rng([self.seed, _EVAL_STREAM + 1, i]))

    def segment(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        self._check(i)
        if self.split == "eval":
            return self.mixtures[i], self.sources[i]
        return self.render(self.draw(rng))


def speech_splits(
    seed: int, n_samples: int, train_mixtures: int, eval_mixtures: int, config: CorpusConfig | None = None
) -> tuple[SpeechMixtures, SpeechMixtures]:
    """Dynamically mixed training set and fixed held-out set of the (cached) speech corpus."""
    corpus = load_corpus(config)
    return (
        SpeechMixtures(corpus, "train", train_mixtures, n_samples, seed),
        SpeechMixtures(corpus, "eval", eval_mixtures, n_samples, seed),
    )
