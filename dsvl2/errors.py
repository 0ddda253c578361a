"""Errors a user of the service can act on.

Every error raised because of a request's content derives from ``InputError`` so that the Cog
adapter can report it as a failed prediction (and the server stays healthy), before any GPU work.
"""


class InputError(ValueError):
    """A request that cannot be served as given; the message names the problem and the limit."""


class ImageError(InputError):
    """An image that cannot be decoded or is outside the accepted limits."""


class PromptTooLong(InputError):
    """The prompt (text plus image tokens) does not fit in the model's context window."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing files, truncated, corrupt or of an unsupported variant."""
