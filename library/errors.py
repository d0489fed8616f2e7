"""Exceptions for problems the user can fix: bad options, files, configs or checkpoints.

Entry scripts catch `UserError`, print its message without a traceback and exit non-zero.
"""


class UserError(Exception):
    """Base of every error caused by user input. The message says what, where, and what would be right."""


class ConfigError(UserError):
    """A dataset config file, training config file or command-line option is invalid."""


class DatasetError(UserError):
    """Images, captions or metadata of a dataset cannot be used."""


class CheckpointError(UserError):
    """A model checkpoint is missing, unreadable, of the wrong architecture or has wrong keys."""


class DiskFullError(UserError):
    """A result could not be written anywhere for lack of disk space."""


class MissingPackageError(UserError):
    """An optional package needed for the requested feature is not installed."""
