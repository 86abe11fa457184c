"""User-facing errors. The CLI prints their message on one line and exits 1, without a traceback."""


class LmdistillError(Exception):
    """Base class: a user mistake or an unusable input, with a message that says what, where and what to do."""


class ConfigError(LmdistillError):
    """The config (file or flags) is invalid."""


class DataError(LmdistillError):
    """A data file or dataset cannot be used."""


class ModelError(LmdistillError):
    """A model or tokenizer cannot be loaded or does not fit with the other."""


class CacheError(LmdistillError):
    """A teacher cache is missing, corrupt or does not match the run."""


class TrainingError(LmdistillError):
    """Training cannot go on (e.g. repeated non-finite losses)."""
