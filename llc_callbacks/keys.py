"""Metric keys; one function writes a key, one reads it back.

A key is ``{prefix}/{field}`` for the full LLC and ``{prefix}/{name}/{field}`` for the
restricted LLC ``name``.

Fields are ``mean``, ``std``, ``healthy`` (1 when every health check passed, else 0),
``chain_<i>``, ``init_loss``, ``num_sampled``, ``num_chains``, ``step_size``,
``free_energy``, ``free_energy_std``, ``stage`` (a confirmed stage boundary's step),
``restart`` (1 with the first estimate of a history that a resume under other settings
started anew),
``diag/<diagnostic>``, ``curvature/<quantity>``, ``kernel/<a>:<b>`` (the loss kernel's
mean correlation between observables ``a`` and ``b``) and ``susceptibility/<source>``.
Restriction names hold no ``/`` except a combination's one (``"<weights>/<source>"``), so the
field is the last part of a key, or the last two after ``diag``, ``curvature``, ``kernel`` or
``susceptibility``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DIAGNOSTICS = "diag"
CURVATURE = "curvature"
KERNEL = "kernel"
SUSCEPTIBILITY = "susceptibility"
# Fields of two parts: ``<kind>/<name>``.
PAIRED = (DIAGNOSTICS, CURVATURE, KERNEL, SUSCEPTIBILITY)
# The groups of per-estimate metrics logged only when asked for (``extra_metrics``), and
# ``"free_energy"``, deprecated for the measure ``FreeEnergy``.
EXTRA_METRICS = ("chains", "diagnostics", "free_energy")
# A prefix: parts of letters, digits, ``_``, ``-`` and ``.``, joined by single ``/``.
PREFIX = re.compile(r"[\w.-]+(/[\w.-]+)*")


class Key(NamedTuple):
    """A metric key read back.

    Attributes:
        prefix: The metric prefix (``llc``, or ``train/llc`` as transformers logs it).
        restriction: The restricted LLC's name, or ``None`` for the full LLC.
        field: What the value is (``mean``, ``chain_0``, ``diag/rhat``, ...).
    """

    prefix: str
    restriction: str | None
    field: str


def metric_key(prefix: str, field: str, restriction: str | None = None) -> str:
    """The key of ``field`` of the full LLC, or of the restricted LLC ``restriction``."""
    return f"{prefix}/{field}" if restriction is None else f"{prefix}/{restriction}/{field}"


def parse_key(key: str, prefix: str) -> Key | None:
    """Read a key written by ``metric_key`` with this prefix.

    Args:
        key: A logged key.
        prefix: The prefix the metrics were written with.

    Returns:
        The key's parts, or ``None`` if it does not start with ``{prefix}/``.
    """
    if not key.startswith(prefix + "/"):
        return None
    parts = key[len(prefix) + 1 :].split("/")
    width = 2 if len(parts) >= 2 and parts[-2] in PAIRED else 1
    restriction = "/".join(parts[:-width]) or None
    return Key(prefix, restriction, "/".join(parts[-width:]))


def check_prefix(prefix: object) -> None:
    """Accept a metric prefix such as ``llc`` or ``probe/llc``.

    Raises:
        ValueError: If ``prefix`` is not a string of parts made of letters, digits, ``_``,
            ``-`` and ``.``, joined by single ``/`` (no leading, trailing or doubled ``/``).
    """
    if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
        raise ValueError(
            "prefix must be one or more parts of letters, digits, '_', '-' or '.' joined by"
            f" single '/' (such as 'llc' or 'probe/llc'), got {prefix!r}"
        )


def extra_group(key: Key) -> str | None:
    """The group of ``EXTRA_METRICS`` a key belongs to, or ``None`` if it is always logged.

    ``chains``: ``chain_<i>``; ``diagnostics``: ``init_loss``, ``diag/<name>`` and a
    restricted LLC's ``healthy``.
    """
    if key.field.startswith("chain_"):
        return "chains"
    restricted_health = key.field == "healthy" and key.restriction is not None
    if key.field == "init_loss" or key.field.startswith(f"{DIAGNOSTICS}/") or restricted_health:
        return "diagnostics"
    return None


def find_prefix(keys: set[str], prefix: str = "llc") -> str | None:
    """The prefix under which ``keys`` hold a full LLC mean, a trainer's own included.

    Args:
        keys: The keys a run logged.
        prefix: The prefix the callback was given; a trainer may put its own in front
            (transformers logs ``llc/mean`` as ``train/llc/mean``).

    Returns:
        The shortest ``P`` equal to ``prefix`` or ending with ``/{prefix}`` such that
        ``{P}/mean`` is in ``keys``; ``None`` if there is none.
    """
    mean = metric_key(prefix, "mean")
    found = [key for key in keys if key == mean or key.endswith("/" + mean)]
    return min(found, key=len).removesuffix("/mean") if found else None
