"""Errors a caller can fix, shared by the engine, the CLI and the server.

Each carries an HTTP status and a short machine-readable ``type``; the server
answers ``{"code", "type", "message"}`` with that status, the CLI prints the
message and exits non-zero.
"""

from __future__ import annotations


class ExplainError(ValueError):
    status = 400
    type = "bad_request"

    def __init__(self, message: str, *, type: str | None = None, status: int | None = None):
        super().__init__(message)
        if type is not None:
            self.type = type
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)

    def to_dict(self) -> dict:
        return {"code": self.status, "type": self.type, "message": self.message}


class InvalidOption(ExplainError):
    type = "invalid_option"


class InvalidTarget(ExplainError):
    type = "invalid_target"


class InvalidImage(ExplainError):
    type = "invalid_image"


class UnsupportedImage(ExplainError):
    status = 415
    type = "unsupported_image_format"


class ImageTooLarge(ExplainError):
    status = 413
    type = "image_too_large"


class UnknownModel(ExplainError):
    status = 404
    type = "unknown_model"


class UnsupportedModel(ExplainError):
    """The engine cannot explain this model: names the activation site and the operation that defeat it.

    Not the request's fault (the same request on another model works): 501, as for any functionality the
    server does not implement.
    """

    status = 501
    type = "unsupported_model"
