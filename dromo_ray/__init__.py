"""dromo_ray: distributed offline model-based RL on Ray around DROMO."""

import os as _os

# MLflow 3 sends usage telemetry unless told not to: a dromo_ray process (CLI, library, Tune trial) sends none
# unless the user turns it on (MLFLOW_DISABLE_TELEMETRY=false).
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
