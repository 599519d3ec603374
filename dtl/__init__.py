"""DTL: Disentangled Transfer Learning (Fu, Zhu, Wu; AAAI 2024) on timm backbones.

``import dtl`` pulls in torch and timm only: the DVC pipeline, the Ray Tune sweeps and MLflow live in
``pipeline/`` and ``sweeps/`` and import their libraries lazily, so the library runs where those are absent.
"""
from .methods import METHODS, DTLModel, available_methods, create_model, get_method, register_method, trainable_parameters
from .models import EMBEDDED_BACKBONE, CheckpointError, register_family
from .multitask import MultiTaskModel
from .trained import TrainedModelError, export_trained, load_trained

__version__ = "0.1.0"
