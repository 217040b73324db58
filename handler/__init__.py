"""Critical-pathway explanations for image classifiers: engine, model specs, CLI and TorchServe handler.

Quick start::

    from handler import ExplanationService
    service = ExplanationService.from_spec("efficientnet_lite0")
    [result] = service.explain_images(["cat.jpg"], sparsity=0.7, outputs=["heatmap", "pathway"])
    result.document["predictions"][0], result.attribution.shape   # (..., (224, 224))
"""

from .engine import Explainer, ExplainRequest, Explanation
from .errors import ExplainError
from .imaging import open_image
from .models import ModelSpec, get_spec, load_model
from .schema import Limits, RequestOptions, parse_options
from .service import ExplanationService, ExplainResult

__all__ = [
    "ExplainError", "ExplainRequest", "ExplainResult", "Explainer", "Explanation", "ExplanationService",
    "Limits", "ModelSpec", "RequestOptions", "get_spec", "load_model", "open_image", "parse_options",
]
