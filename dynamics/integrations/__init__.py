"""Callbacks that record (and clip) training run by a framework's trainer.

- ``dynamics.integrations.lightning``: ``DynamicsCallback`` and ``AutoClipCallback`` for a Lightning ``Trainer``.
- ``dynamics.integrations.huggingface``: ``DynamicsCallback``, ``AutoClipCallback`` and ``RecordingTrainer`` for a
  Hugging Face ``transformers.Trainer``.
- ``dynamics.integrations.core``: what both share (the Recorder's start, each step, finish and failure; the
  pairing of an AutoClipCallback with the Recorder); a callback for another framework builds on it.

Each framework module imports its framework; this package imports neither, so ``dynamics`` works without them.
"""
