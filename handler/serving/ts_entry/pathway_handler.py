"""TorchServe imports this top-level module from the model archive; the work happens in handler.serving.handler."""

from handler.serving.handler import handle  # noqa: F401
