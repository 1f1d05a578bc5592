"""Local Learning Coefficient estimation inside the trainers people already use."""

from llc_callbacks.calibration import Calibration, calibrate
from llc_callbacks.config import LLCConfig
from llc_callbacks.dynamics import EssentialDynamics
from llc_callbacks.estimator import estimate_llc, estimate_restricted_llcs
from llc_callbacks.monitor import LLCMonitor
from llc_callbacks.observables import (
    Covariance,
    Probe,
    Susceptibility,
    bif,
    loss_kernel,
    susceptibility,
    token_losses,
)
from llc_callbacks.restrictions import Restrictions
from llc_callbacks.result import LLCResult
from llc_callbacks.schedule import log_spaced_steps

__all__ = [
    "Calibration",
    "Covariance",
    "EssentialDynamics",
    "LLCConfig",
    "LLCMonitor",
    "LLCResult",
    "Probe",
    "Restrictions",
    "Susceptibility",
    "bif",
    "calibrate",
    "estimate_llc",
    "estimate_restricted_llcs",
    "log_spaced_steps",
    "loss_kernel",
    "susceptibility",
    "token_losses",
]
__version__ = "0.1.0.dev0"
