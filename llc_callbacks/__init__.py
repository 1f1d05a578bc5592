"""Local Learning Coefficient estimation inside the trainers people already use."""

from llc_callbacks.config import LLCConfig
from llc_callbacks.estimator import estimate_llc
from llc_callbacks.result import LLCResult

__all__ = ["LLCConfig", "LLCResult", "estimate_llc"]
__version__ = "0.1.0.dev0"
