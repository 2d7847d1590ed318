"""Errors the library raises. The CLI prints their message on one line and exits non-zero."""


class SlncxError(Exception):
    """Base class: a problem the user can act on; the message says what and where."""


class FormatError(SlncxError):
    """A file is not what the format says it must be (truncated, wrong class, wrong shape...)."""


class UnsafePickleError(FormatError):
    """A pickle references a global outside the allow-list; nothing was executed."""


class StructureError(SlncxError):
    """A checkpoint is missing tensors, has extra files, or does not match the parameter table."""


class ChecksumError(SlncxError):
    """Bytes on disk do not match their recorded SHA-256."""


class MeshError(SlncxError):
    """A device mesh is malformed or does not divide the dimensions it shards."""


class ConfigError(SlncxError):
    """A model configuration is inconsistent or cannot be inferred."""


class DownloadError(SlncxError):
    """A download failed for a reason the user must fix (auth, missing repo, disk space...)."""


class DiskSpaceError(SlncxError):
    """Not enough free disk space for the job."""
