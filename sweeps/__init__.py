"""Ray Tune + Optuna sweeps over the dtl experiment schema."""
from dtl.extras import require_extra

require_extra("the sweeps", "sweeps", ("ray", "optuna", "mlflow", "scipy", "matplotlib"))

import matplotlib  # noqa: E402 (present: checked just above)

from .cluster import ray_settings  # noqa: E402

matplotlib.use("Agg")  # the sweeps' plots are files; drivers and Ray workers have no display
ray_settings()  # before any module of the package imports Ray
