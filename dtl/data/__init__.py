"""Data for DTL: VTAB-1K folders (``vtab``), the synthetic VTAB-like suite (``synthetic``) and the scene
renderer both the suite and the embedded backbone's pretraining use (``dtl.data.scenes``)."""
from dtl.data.synthetic import (
    GENERATOR_VERSION,
    PATTERNS,
    SYNTHETIC_TASKS,
    SyntheticTask,
    generate_synthetic_suite,
    sample_task,
)
from dtl.data.vtab import (
    SPLITS,
    TASK_GROUPS,
    VTAB_TASKS,
    DataError,
    VTabDataset,
    check_vtab_root,
    resolve_num_classes,
    vtab_transform,
)

__all__ = [
    "GENERATOR_VERSION", "PATTERNS", "SYNTHETIC_TASKS", "SyntheticTask", "generate_synthetic_suite", "sample_task",
    "SPLITS", "TASK_GROUPS", "VTAB_TASKS", "DataError", "VTabDataset", "check_vtab_root", "resolve_num_classes",
    "vtab_transform",
]
