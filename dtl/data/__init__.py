"""Data for DTL: VTAB-1K folders (``vtab``), few-shot folders in the NOAH layout (``few_shot``), the
domain-generalisation targets and their 200-class accuracy (``domain_generalization``), the synthetic VTAB-like
suite (``synthetic``) and the scene renderer both the suite and the embedded backbone's pretraining use
(``dtl.data.scenes``)."""
from dtl.data.domain_generalization import DG_TARGETS, masked_predictions, target_accuracies
from dtl.data.few_shot import FEW_SHOT_DATASETS, FewShotDataset, check_few_shot_root
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
    "DG_TARGETS", "masked_predictions", "target_accuracies", "FEW_SHOT_DATASETS", "FewShotDataset",
    "check_few_shot_root",
    "GENERATOR_VERSION", "PATTERNS", "SYNTHETIC_TASKS", "SyntheticTask", "generate_synthetic_suite", "sample_task",
    "SPLITS", "TASK_GROUPS", "VTAB_TASKS", "DataError", "VTabDataset", "check_vtab_root", "resolve_num_classes",
    "vtab_transform",
]
