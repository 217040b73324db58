"""Evaluating explanations: pixel perturbation, insertion/deletion, cascading randomisation, localisation.

Engine-level (no HTTP): maps come from the same :class:`~handler.engine.Explainer`
as the server's, for any method and selection strategy in the registries.
``pathway-eval`` (:mod:`.cli`) runs these protocols from the command line;
:mod:`.synthetic` generates the localisation set with ground-truth boxes.
"""

from .localisation import Box, energy_in_box, localisation, pointing_hit, tolerance_for
from .maps import Maps, MethodVariant, all_variants, explain_maps, target_probabilities
from .pathway_overlap import alive_neurons, compare_selections, jaccard
from .perturbation import (FRACTIONS, RISE_STEP, blurred, insertion_deletion, pixel_perturbation, relevance_order,
                           trapezoid_auc)
from .randomisation import cascade_stages, cascading_randomisation, hog_similarity, reinitialise, spearman, ssim
from .suite import PROTOCOLS, EvaluationConfig, ImageSet, evaluate, photo_set, synthetic_set
from .synthetic import SyntheticDigits

__all__ = [
    "Box", "EvaluationConfig", "FRACTIONS", "ImageSet", "Maps", "MethodVariant", "PROTOCOLS", "RISE_STEP",
    "SyntheticDigits", "alive_neurons", "all_variants", "blurred", "cascade_stages", "cascading_randomisation",
    "compare_selections", "energy_in_box", "evaluate", "explain_maps", "hog_similarity", "insertion_deletion",
    "jaccard", "localisation", "photo_set", "pixel_perturbation", "pointing_hit", "reinitialise",
    "relevance_order", "spearman", "ssim", "synthetic_set", "target_probabilities", "tolerance_for",
    "trapezoid_auc",
]
