"""Errors of the built-in task that a user can fix (bad data), told apart from bugs."""


class DataError(ValueError):
    """The training or held-out data is missing, unreadable or not what the task expects."""
