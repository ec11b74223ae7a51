"""robust-reg: task-agnostic adversarial robustness for self-supervised representations.

Add one loss term to any SSL training loop::

    reg = RobustnessRegularizer(epsilon=8 / 255, norm="linf", steps=3)
    loss = ssl_loss + weight * reg(backbone, x, features=h)

and measure what the representation guarantees downstream with
:func:`estimate_bound`. Numbers that come from gradient ascent (the regulariser,
the bound, attack accuracies) are estimates of a worst case, and named so.
"""

from .attacks import ThreatModel, pgd_attack, projected_gradient_ascent
from .bound import BoundReport, RobustnessCurve, estimate_bound, linear_head_lipschitz, robustness_curve
from .probe import extract_features, fit_linear_probe
from .regularizer import RegularizerOutput, RegularizerStats, RobustnessRegularizer
from .warm_start import PerturbationMemory, crop_geometry

__version__ = "0.1.0"

__all__ = [
    "BoundReport",
    "PerturbationMemory",
    "RegularizerOutput",
    "RegularizerStats",
    "RobustnessCurve",
    "RobustnessRegularizer",
    "ThreatModel",
    "crop_geometry",
    "estimate_bound",
    "extract_features",
    "fit_linear_probe",
    "linear_head_lipschitz",
    "pgd_attack",
    "projected_gradient_ascent",
    "robustness_curve",
]
