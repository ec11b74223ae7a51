"""robust-reg: task-agnostic adversarial robustness for self-supervised representations.

Add one loss term to any SSL training loop (``model`` outputs what the SSL loss compares):

    reg = RobustnessRegularizer(epsilon=8 / 255)          # the recommended form, nothing else to set
    z0, z1 = model(x0), model(x1)
    out = reg(model, x1, features=z1, positive=z0)
    loss = ssl_loss(z0, out.adversarial_features) + weight * out.loss

and measure what the representation guarantees downstream with
``estimate_bound``. A backbone that is already pretrained is made robust without labels by
``harden(backbone, loader, epsilon=8 / 255)``. Numbers that come from gradient ascent (the regulariser,
the bound, attack accuracies) are estimates of a worst case, and named so.
"""

from ._state import preserved_state
from .attacks import ThreatModel, pgd_attack, projected_gradient_ascent
from .bound import BoundReport, RobustnessCurve, estimate_bound, linear_head_lipschitz, robustness_curve
from .collapse import CollapseMonitor, CollapseReport
from .hardening import HARDEN_CPU, harden
from .methods import MethodSettings, method_settings
from .probe import extract_features, fit_linear_probe
from .regularizer import BackboneRobustnessRegularizer, RegularizerOutput, RegularizerStats, RobustnessRegularizer
from .warm_start import PerturbationMemory, WarmStart, crop_geometry, ramped_epsilon

__version__ = "0.2.0"

__all__ = [
    "HARDEN_CPU",
    "BackboneRobustnessRegularizer",
    "BoundReport",
    "CollapseMonitor",
    "CollapseReport",
    "MethodSettings",
    "PerturbationMemory",
    "RegularizerOutput",
    "RegularizerStats",
    "RobustnessCurve",
    "RobustnessRegularizer",
    "ThreatModel",
    "WarmStart",
    "crop_geometry",
    "estimate_bound",
    "harden",
    "extract_features",
    "fit_linear_probe",
    "linear_head_lipschitz",
    "method_settings",
    "pgd_attack",
    "preserved_state",
    "projected_gradient_ascent",
    "ramped_epsilon",
    "robustness_curve",
]
