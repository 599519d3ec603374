"""Ray Tune + Optuna sweeps over the dtl experiment schema."""
