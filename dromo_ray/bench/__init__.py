"""Benchmarks that print figures (``dromo-ray bench ...``); never timed tests."""
