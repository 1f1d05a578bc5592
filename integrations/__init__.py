"""Adapters from trainers (Lightning, transformers) to the framework-neutral core.

Installed as ``llc_callbacks.integrations``.
"""
