"""dromo_ray: distributed offline model-based RL on Ray around DROMO."""

__version__ = "0.1.0"
