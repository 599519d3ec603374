"""The DVC pipeline stages (thin scripts over `dtl`) and the MLflow records they share with the sweeps."""
from dtl.extras import require_extra

require_extra("the DVC pipeline", "pipeline", ("dvc", "mlflow", "matplotlib", "psutil"))
