"""Errors raised for bad user input: each names the file or field and what was wrong."""


class TeranInputError(ValueError):
    """Bad input given by a user (file, caption, tensor): the message says what and why."""


class ImageDecodeError(TeranInputError):
    """An image file or buffer is missing, unreadable, corrupt or too large."""


class CaptionError(TeranInputError):
    """A caption is empty or longer than the configured limit."""


class FeatureShapeError(TeranInputError):
    """Region features or boxes have the wrong shape, dtype or non-finite values."""


class CheckpointError(TeranInputError):
    """A checkpoint file is missing, unreadable, or holds another model."""
