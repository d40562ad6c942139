"""Analyses of Florence-VL models (not part of the Hub payload): the paper's vision-language alignment loss."""

from .alignment import (
    FEATURE_NAMES,
    AlignmentFeatures,
    alignment_curve,
    alignment_loss,
    extract_features,
    feature_names,
    feature_subsets,
    final_loss,
    make_projection,
    plot_curves,
    run_alignment,
)

__all__ = [
    "FEATURE_NAMES",
    "AlignmentFeatures",
    "alignment_curve",
    "alignment_loss",
    "extract_features",
    "feature_names",
    "feature_subsets",
    "final_loss",
    "make_projection",
    "plot_curves",
    "run_alignment",
]
