"""Every error a caller can fix, in one place: a machine-readable ``code`` and a message.

The engine, the models, imaging and the service raise these; none of them knows
HTTP. The server maps a code to a status and a reason phrase in one table
(:mod:`handler.serving.statuses`) and answers ``{"code", "type", "message"}``;
the CLI prints the message and exits non-zero. Anything else that escapes a
request is a bug, which the server answers as a 500 ``internal_error``.
"""

from __future__ import annotations


class ExplainError(ValueError):
    """An error the caller can fix; ``code`` names the cause for programs, the message for people."""

    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that quote what a caller sent (a
    5000-digit number or a pasted file should not come back whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class BadRequest(ExplainError):
    """A request the transport could not read (body, fields, base64, envelope)."""


class UnsupportedMediaType(ExplainError):
    code = "unsupported_media_type"


class InvalidOption(ExplainError):
    code = "invalid_option"


class UnknownNameError(InvalidOption):
    """A name that is not registered (method, selection, reduction, architecture); the message lists the
    names that are, the code says which registry."""


class InvalidTarget(ExplainError):
    code = "invalid_target"


class InvalidImage(ExplainError):
    code = "invalid_image"


class UnsupportedImage(ExplainError):
    code = "unsupported_image_format"


class ImageTooLarge(ExplainError):
    code = "image_too_large"


class UnknownModel(ExplainError):
    code = "unknown_model"


class OutOfMemory(ExplainError):
    """The request could not be served in the memory there is (its batch neighbours were)."""

    code = "out_of_memory"


class InternalError(ExplainError):
    """A bug met while serving one request: reported as such (and logged with its traceback), never as the
    caller's fault."""

    code = "internal_error"


class ResponseTooLarge(ExplainError):
    """The answer a request asked for is larger than the server sends (``max_response_bytes``)."""

    code = "response_too_large"


class UsageError(Exception):
    """A command line the CLIs cannot run (conflicting flags, a missing file, no CUDA): exit status 2."""


class UnsupportedModel(ExplainError):
    """The engine cannot explain this model: names the activation site and the operation that defeat it.

    Not the request's fault (the same request on another model works): the server answers it as a
    functionality it does not implement.
    """

    code = "unsupported_model"
