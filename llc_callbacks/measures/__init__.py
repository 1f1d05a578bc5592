"""Measures: what a monitor computes next to the LLC at each reading.

A measure is an object with a small protocol (``Measure``) that the monitor runs after each
reading under its error policy, and whose metrics, tables and figures are logged under its
prefix next to the LLC's.
The monitor and the callbacks take them as ``measures=[...]``; a measure of your own is a
subclass of ``Measure``.
"""

from llc_callbacks.measures.base import Figure, Measure, Output, Reading, Run, Table
from llc_callbacks.measures.curvature import Curvature
from llc_callbacks.measures.free_energy import FreeEnergy
from llc_callbacks.measures.traces import Traces

__all__ = [
    "Curvature",
    "Figure",
    "FreeEnergy",
    "Measure",
    "Output",
    "Reading",
    "Run",
    "Table",
    "Traces",
]
