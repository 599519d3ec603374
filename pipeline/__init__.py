"""The DVC pipeline stages (thin scripts over `dtl`) and the MLflow records they share with the sweeps."""
