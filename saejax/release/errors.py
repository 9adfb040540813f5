"""The one error type of release and load: a one-line message naming the file, key or site."""


class ReleaseError(ValueError):
    """A release input or a released file that cannot be used (missing, malformed, unsafe)."""
