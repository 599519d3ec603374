"""Data for DTL: VTAB-1K folders (``vtab``), few-shot folders in the NOAH layout (``few_shot``), the
domain-generalisation source and targets and their 200-class mask (``domain_generalization``), the embedded
suites of the three experiments (``synthetic``, ``synthetic_few_shot``, ``synthetic_domain_shift``) and the scene
renderer they and the embedded backbone's pretraining use (``dtl.data.scenes``). The list-file format all of
them read, and its checks, are in ``dtl.data.lists``."""
from dtl.data.domain_generalization import DG_TARGETS, check_domain_root, masked_predictions
from dtl.data.few_shot import FEW_SHOT_DATASETS, FewShotDataset, check_few_shot_root
from dtl.data.lists import DataError
from dtl.data.synthetic import (
    GENERATOR_VERSION,
    PATTERNS,
    SYNTHETIC_TASKS,
    SyntheticTask,
    generate_synthetic_suite,
    sample_task,
)
from dtl.data.synthetic_domain_shift import generate_domain_shift_suite
from dtl.data.synthetic_few_shot import SYNTHETIC_FEW_SHOT, generate_few_shot_suite
from dtl.data.vtab import (
    SPLITS,
    TASK_GROUPS,
    VTAB_TASKS,
    VTabDataset,
    check_vtab_root,
    resolve_num_classes,
    vtab_transform,
)

__all__ = [
    "DG_TARGETS", "check_domain_root", "masked_predictions", "FEW_SHOT_DATASETS", "FewShotDataset",
    "check_few_shot_root", "SYNTHETIC_FEW_SHOT", "generate_few_shot_suite", "generate_domain_shift_suite",
    "GENERATOR_VERSION", "PATTERNS", "SYNTHETIC_TASKS", "SyntheticTask", "generate_synthetic_suite", "sample_task",
    "SPLITS", "TASK_GROUPS", "VTAB_TASKS", "DataError", "VTabDataset", "check_vtab_root", "resolve_num_classes",
    "vtab_transform",
]
