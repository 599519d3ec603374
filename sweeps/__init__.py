"""Ray Tune + Optuna sweeps over the dtl experiment schema."""
from dtl.extras import require_extra

require_extra("the sweeps", "sweeps", ("ray", "optuna", "mlflow", "scipy", "matplotlib"))
