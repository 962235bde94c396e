"""The one error type for bad dataset input."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file or array is not what kinema expects.

    Messages name the file (or the dataset's ``source``), the key, and what was expected,
    so a user can fix the input without reading kinema's code.
    """
