"""Helpers of tools/real_models.py (not part of the package): metrics, data, model specs, fetching."""
