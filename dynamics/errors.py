"""The library's exceptions: every error the Python API raises for a caller's mistake is a DynamicsError.

``DynamicsError`` is a ``ValueError``; its kinds also derive from the built-in a caller would
expect (``TypeError`` for a wrong type, ``RuntimeError`` for a call out of order), so existing
``except`` clauses keep working. Each message names the fix.
"""

from __future__ import annotations


class DynamicsError(ValueError):
    """A mistake in how dyn is called or what it was given, with a message that names the fix."""


class ArgumentTypeError(DynamicsError, TypeError):
    """An argument of the wrong type (a string where a model is needed, a float where an int is)."""


class CallOrderError(DynamicsError, RuntimeError):
    """A call out of order: a step phase skipped, a closed Recorder used, two threads on one Recorder."""
