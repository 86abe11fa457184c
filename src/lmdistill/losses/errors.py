"""Errors raised by the loss library. They are `LmdistillError`s (the CLI prints them on one line) and also
`ValueError`s, so code that validates a loss config can catch either."""

from __future__ import annotations

from lmdistill.errors import ConfigError, LmdistillError


class LossConfigError(ConfigError, ValueError):
    """A loss is named or parameterised wrongly (unknown name, parameter out of range, unknown key)."""


class LossInputError(LmdistillError, ValueError):
    """Tensors given to a loss do not fit together (shapes, vocabulary, missing labels or attentions)."""
