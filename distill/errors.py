"""User-facing errors. The CLI prints them on one line and exits with status 2."""


class AnyoError(Exception):
    """Base class for every error caused by the user's input, not by a bug."""


class DataError(AnyoError):
    """A data file is missing or malformed; the message names the file and line."""


class ConfigError(AnyoError):
    """A recipe or command-line option is invalid; the message names the key."""


class ArtifactError(AnyoError):
    """An artifact on disk is missing, corrupt, or was built from other inputs."""


class StaleError(ArtifactError):
    """An artifact is intact but was built from other inputs (split, upstream model, recipe)."""


class CorruptError(ArtifactError):
    """An artifact's files do not match its own record (edited, truncated, missing)."""
