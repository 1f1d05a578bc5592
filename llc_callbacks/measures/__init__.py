"""Measures: what a monitor computes next to the LLC at each reading.

A measure is an object with a small protocol (``Measure``) that the monitor runs after each
reading under its error policy, and whose metrics it logs under its prefix next to the LLC's.
The monitor and the callbacks take them as ``measures=[...]``; a measure of your own is a
subclass of ``Measure``.
"""

from llc_callbacks.measures.base import Measure, Reading, Run
from llc_callbacks.measures.curvature import Curvature
from llc_callbacks.measures.free_energy import FreeEnergy

__all__ = ["Curvature", "FreeEnergy", "Measure", "Reading", "Run"]
