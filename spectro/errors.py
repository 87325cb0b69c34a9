"""Exception types. Every user-facing failure is one of these, raised early,
with a message that says what is wrong and how to fix it."""


class SpectroError(Exception):
    """Base class for every error spectro raises on purpose."""


class ConfigError(SpectroError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class ModelLoadError(SpectroError):
    """A model source cannot be found, read, or is not a supported architecture."""


class DataError(SpectroError):
    """A corpus or probe set is empty, unreadable, or does not fit the model."""


class ComponentError(SpectroError, ValueError):
    """A component name is unknown or repeated."""


class StoreError(SpectroError):
    """A run store is missing, partial, corrupted, or belongs to another config."""


class SAEError(SpectroError):
    """A sparse autoencoder cannot be loaded, trained or matched (bad files, shapes or settings)."""


class UnsafePathError(SpectroError, ValueError):
    """A name taken from a config or a store would write outside the run directory."""


class DiskFullError(StoreError):
    """The disk (or quota) holding the run directory is full; completed chunks are kept."""


class DivergenceError(SpectroError):
    """No estimate is possible: the chains it needs diverged (or produced non-finite losses)."""


class SamplingFailed(SpectroError):
    """A unit of sampling work could not be completed (it kept killing actors, or raised)."""
