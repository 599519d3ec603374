"""What an evaluation protocol is: the base class every protocol module subclasses, and the registry.

A protocol decides everything that differs between VTAB-1K's ``final`` and ``val`` runs, few-shot
classification, domain generalisation and semantic segmentation:

* **data**: where a split's list file is, how a split opens as a dataset, how many classes a task has, which
  embedded suite ``data.source: synthetic`` generates, how the folders are checked, and what the prepare
  stage records per task;
* **runs**: the run grid of a task (seeds; shot counts x seeds), the split trained on, the splits scored while
  training and reported after it, whose best epoch is kept, which protocol a sweep's trials follow, and what a
  label is (``objective``: a class per image, or a label map per image);
* **results**: how the evaluated tasks aggregate into a report (numbers, Markdown, DVC metrics and plot rows,
  MLflow metrics, the figure).

A protocol class is instantiated for one configuration (``config.protocol``), so its methods read the settings
they need. Registering a subclass (:func:`register_protocol`) makes its name valid for ``evaluation.protocol``;
nothing else in the toolkit knows a protocol by name. This module imports no torch: the data and plotting
libraries are imported by the methods that use them.
"""
from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..io import atomic_path

# objective -> the score that chooses between models of it (dtl.objectives computes them)
SCORES = {"classification": "accuracy", "segmentation": "miou"}


@dataclass(frozen=True)
class SyntheticSuite:
    """The embedded suite a configuration needs: the folders to generate, the names the generator knows, the
    generator (``generate(root, names, image_size=, num_test=, seed=, overwrite=)``), what its folders are
    called in messages, and the config key that names them."""

    names: list[str]
    known: tuple[str, ...]
    generate: Callable[..., object]
    what: str
    key: str = "data.tasks"


class Protocol:
    """One evaluation protocol, bound to a configuration (``self.config``, an ``ExperimentConfig``)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for messages and docs
    sources: ClassVar[tuple[str, ...]] = ()  # the data.source folder layouts that serve it (besides synthetic)
    train: ClassVar[str] = ""  # the split a run trains on
    scored: ClassVar[dict[str, str]] = {}  # name -> split, scored after the last epoch (and every eval_every)
    reported: ClassVar[dict[str, str]] = {}  # name -> split, what evaluating the saved weights scores
    keep_best: ClassVar[str | None] = None  # the scored split whose best epoch's weights are kept
    selection: ClassVar[str] = "val"  # the protocol a sweep's trials follow: never one that scores test sets
    objective: ClassVar[str] = "classification"  # what a label is (dtl.objectives): classification, segmentation

    def __init__(self, config) -> None:
        self.config = config

    @property
    def segments(self) -> bool:
        """Whether a label is a map of the image (semantic segmentation) rather than one class per image."""
        return self.objective == "segmentation"

    @property
    def score(self) -> str:
        """The score that chooses (the best epoch, a sweep's winner): ``accuracy``, or ``miou`` for segmentation."""
        return SCORES[self.objective]

    # --- the configuration ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Checks of the configuration that only this protocol needs (raise ``ConfigError`` naming the key)."""

    # --- data ----------------------------------------------------------------------------------------------
    def split_list(self, task: str, split: str, shots: int | None = None, seed: int | None = None) -> Path:
        """The list file a split of ``task`` is read from."""
        raise NotImplementedError

    def input_name(self, task: str, split: str, path: Path) -> str:
        """A short name of a split's list as a dataset input (``digits/train800``)."""
        return f"{task}/{split}"

    def split_input(self, task: str, split: str, shots: int | None = None,
                    seed: int | None = None) -> tuple[str, Path]:
        """A split's list as a dataset input: its short name and the list file."""
        path = self.split_list(task, split, shots, seed)
        return self.input_name(task, split, path), path

    def num_classes(self, task: str) -> int:
        raise NotImplementedError

    def open_split(self, task: str, split: str, *, num_classes: int, img_size: int, shots: int | None = None,
                   seed: int | None = None, model=None):
        """The dataset of one split of ``task`` as this protocol reads it."""
        raise NotImplementedError

    def transform(self, image_size: int, normalisation: dict):
        """PIL image -> model input, as this protocol's evaluation reads images."""
        raise NotImplementedError

    def input_format(self, image_size: int, normalisation: dict) -> tuple:
        """What :meth:`transform` depends on: equal formats read an image into the same tensor (protocols that
        share a transform share formats)."""
        return (type(self).transform.__qualname__, image_size, tuple(sorted(normalisation.items())))

    def synthetic_suite(self, tasks: Sequence[str] | None = None) -> SyntheticSuite:
        raise NotImplementedError

    def check_data(self, tasks: Sequence[str] | None = None, **options) -> dict[str, dict]:
        """Check every list this protocol reads for ``tasks`` (default ``data.tasks``); problems raise one
        ``DataError``. ``verify_images``, ``verified`` and ``progress`` pass through to the checker."""
        raise NotImplementedError

    def ensure_data(self, tasks: Sequence[str] | None = None) -> Path:
        """Make sure the task folders exist: generate the embedded suite if ``data.source`` is synthetic, then
        check the folders."""
        data = self.config.data
        root = Path(data.root)
        if data.source == "synthetic":
            suite = self.synthetic_suite(tasks)
            suite.generate(root, suite.names, image_size=data.image_size or 32, num_test=data.num_test,
                           seed=data.generator_seed)
        self.check_data(tasks)
        return root

    def task_records(self, checked: dict[str, dict]) -> dict[str, dict]:
        """What the prepare stage records per task from :meth:`check_data`'s result: counts, classes, group,
        the smallest training split (``train_images``) and a fingerprint of the files the task reads."""
        raise NotImplementedError

    def manifest_totals(self, records: dict[str, dict]) -> dict[str, Any]:
        """Extra fields of the prepare stage's manifest."""
        return {}

    def describe_record(self, record: dict) -> str:
        """The image counts of one task record, for the prepare stage's line."""
        return ", ".join(f"{split} {n}" for split, n in record["images"].items() if not isinstance(n, dict))

    # --- runs ----------------------------------------------------------------------------------------------
    def runs(self) -> list[tuple[int | None, int]]:
        """``(shots, seed)`` of every run of a task (shots None where the protocol has no shot counts)."""
        return [(None, seed) for seed in self.config.evaluation.seeds]

    def run_shots(self, shots: int | None) -> int | None:
        """The shot count of one run (None where the protocol has no shot counts)."""
        return None

    def scored_splits(self, task: str) -> dict[str, str]:
        """What a run scores while it trains."""
        return dict(self.scored)

    def reported_splits(self, task: str) -> dict[str, str]:
        """What evaluating the saved weights scores."""
        return dict(self.reported)

    def targets(self) -> list[str]:
        """Domains tested besides the task itself (reported as ``<target>_accuracy``)."""
        return []

    def target_splits(self) -> set[str]:
        """The reported splits that are other domains' test lists: scored masked too when they hold only some
        of the classes."""
        return set()

    def training_split_words(self) -> str:
        """The training split in an error message (``train800 split``)."""
        return f"{self.train} split"

    def selection_objective(self) -> str:
        """What a sweep under this protocol selects on, in words (for its reports)."""
        raise NotImplementedError

    # --- results -------------------------------------------------------------------------------------------
    def aggregate(self, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        """A task's scores over its runs (``per_seed``: one dict of scores per run, with its ``seed`` and, where
        the protocol has shot counts, ``shots``): means over seeds, and the std of every accuracy
        (``<key>_std``); with several shot counts also per shot count (``shots``), the overall figures then the
        mean over shot counts."""
        counts = sorted({s["shots"] for s in per_seed if s.get("shots") is not None})
        if len(counts) <= 1:
            return {**seed_means(per_seed), "num_seeds": len(per_seed)}
        by_shots = {}
        for shots in counts:
            runs = [s for s in per_seed if s["shots"] == shots]
            by_shots[str(shots)] = {**seed_means(runs), "num_seeds": len(runs)}
        keys = [k for k in by_shots[str(counts[0])] if not k.endswith("_std") and k != "num_seeds"]
        overall = {key: statistics.fmean(part[key] for part in by_shots.values()) for key in keys}
        return {**overall, "shots": by_shots, "num_seeds": len({s["seed"] for s in per_seed})}

    def dvc_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A task's DVC metrics (``metrics/<task>.json``) from its aggregated scores and costs: test accuracy and
        what matters next to it, under names short enough for ``dvc metrics show`` to fit a terminal: per shot
        count (``<k>shot``), per target domain, val accuracy, then the costs."""
        short = {"test_acc": round(metrics["test_accuracy"], 4)}
        for shots, part in metrics.get("shots", {}).items():
            short[f"{shots}shot"] = round(part["test_accuracy"], 4)
        for target in self.targets():
            short[target] = round(metrics[f"{target}_accuracy"], 4)
        if "val_accuracy" in metrics and not metrics.get("shots"):
            short["val_acc"] = round(metrics["val_accuracy"], 4)
        return {**short, **dvc_costs(metrics)}

    def build_report(self, evaluated: dict[str, tuple[dict, dict]]) -> dict[str, Any]:
        """The report of ``evaluated`` (task -> (its evaluate metrics, its evaluate details)): every number
        the report stage writes, with ``rows`` (one per task: method, costs, MLflow run id)."""
        raise NotImplementedError

    def report_outputs(self, report: dict[str, Any]) -> tuple[dict, dict, list[dict]]:
        """(``outputs/report.json``, ``metrics/summary.json``, ``plots/tasks.json`` rows) of a report."""
        raise NotImplementedError

    def report_markdown(self, report: dict[str, Any]) -> str:
        raise NotImplementedError

    def report_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        """The MLflow metrics of the report run (accuracies; the report stage adds the costs)."""
        raise NotImplementedError

    def report_line(self, report: dict[str, Any]) -> str:
        """One console line with the headline figures."""
        raise NotImplementedError

    def report_samples(self, report: dict[str, Any], segmenter: Callable[[str], Callable]) -> None:
        """Add to ``report`` what its figure shows of the trained models' own predictions, before
        :meth:`report_plot` (``segmenter(task)``: the trained model of ``task`` as a function from a PIL image to
        its label map); nothing unless the protocol's figure needs it."""

    def report_plot(self, report: dict[str, Any], path: Path) -> None:
        """Draw the report's figure to ``path`` (PNG)."""
        raise NotImplementedError


_PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(protocol: type[Protocol]) -> type[Protocol]:
    """Make ``protocol`` (a :class:`Protocol` subclass) available as ``evaluation.protocol: <its name>``."""
    if not protocol.name or protocol.name in _PROTOCOLS:
        raise ValueError(f"a protocol needs a new name, got {protocol.name!r}")
    _PROTOCOLS[protocol.name] = protocol
    return protocol


def available_protocols() -> tuple[str, ...]:
    return tuple(_PROTOCOLS)


def get_protocol(name: str) -> type[Protocol]:
    try:
        return _PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}: expected one of {', '.join(_PROTOCOLS)}") from None


def data_sources() -> tuple[str, ...]:
    """``synthetic`` and every folder layout some protocol reads, in registration order."""
    return ("synthetic", *dict.fromkeys(s for p in _PROTOCOLS.values() for s in p.sources))


def protocols_for_source(source: str) -> tuple[str, ...]:
    """The protocols a data folder of ``source`` serves (synthetic: all of them, each its own embedded suite)."""
    if source == "synthetic":
        return available_protocols()
    return tuple(name for name, p in _PROTOCOLS.items() if source in p.sources)


def fingerprint(root: Path, paths: list[Path]) -> str:
    """A digest of the files a task reads its images' names and labels from, by their place under ``root`` (so
    moving the root changes nothing; a missing file counts as absent)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0"
                      + (path.read_bytes() if path.is_file() else b"<absent>"))
    return digest.hexdigest()


# --- what the reports of every protocol share ---------------------------------------------------------------
def seed_means(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over runs of every score, and the std of every accuracy and mIoU (``<key>_std``; 0 for one run)."""
    metrics: dict[str, float] = {}
    for key in per_seed[0]:
        if key in ("seed", "shots"):
            continue
        values = [s[key] for s in per_seed]
        metrics[key] = statistics.fmean(values)
        if any(score in key for score in SCORES.values()):  # accuracy_masked too
            metrics[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return metrics


# A task's parameter counts and training throughput, the costs a report row takes from its metrics as they are.
PARAMETER_AND_THROUGHPUT_KEYS = ("trainable_params", "trainable_params_excl_head", "images_per_s")
# The memory figures a task reports, each named for what it measures: the bytes autograd keeps for backward per
# batch (DTL's saving; the same on every device), the CUDA allocator's peaks while training, and the process's
# peak resident memory (host RAM: on a CPU, everything the process held).
MEMORY_LABELS = {
    "saved_for_backward_mb": "kept for backward (MB per batch)",
    "gpu_peak_allocated_mb": "GPU peak allocated (MB)",
    "gpu_peak_reserved_mb": "GPU peak reserved (MB)",
    "peak_rss_mb": "process peak RSS (MB)",
}


def memory_figures(metrics: dict[str, Any], memory_kind: str | None = None) -> dict[str, float]:
    """The memory figures of :data:`MEMORY_LABELS` that a task's evaluated metrics hold. Metrics written before
    the figures had their own names hold one ``peak_memory_mb``: the GPU's peak allocated memory or the process's
    peak RSS, as ``memory_kind`` (``gpu_allocated`` or ``process_rss``) says."""
    figures = {key: metrics[key] for key in MEMORY_LABELS if metrics.get(key) is not None}
    if "peak_memory_mb" in metrics:
        old = "gpu_peak_allocated_mb" if memory_kind == "gpu_allocated" else "peak_rss_mb"
        figures.setdefault(old, metrics["peak_memory_mb"])
    return figures


# The memory figures' names in the DVC metrics files, where every column counts: "saved" is the bytes kept for
# backward, as in the sweeps' saved_bytes objective and the benchmarks' "saved MiB".
DVC_MEMORY_NAMES = {"saved_for_backward_mb": "saved_mb"}


def dvc_costs(metrics: dict[str, Any]) -> dict[str, Any]:
    """The costs a task's DVC metrics file holds after its scores: trainable parameters (the head excluded),
    the memory figures and the training throughput."""
    memory = {DVC_MEMORY_NAMES.get(key, key): round(value, 1) for key, value in memory_figures(metrics).items()}
    return {"params": metrics["trainable_params_excl_head"], **memory, "images_s": round(metrics["images_per_s"], 1)}


def measured_memory(rows: list[dict[str, Any]]) -> str:
    """The peak every row measured: the GPU's where every run trained on one, else the process's RSS."""
    return "gpu_peak_allocated_mb" if all("gpu_peak_allocated_mb" in r for r in rows) else "peak_rss_mb"


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def percent(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} ± {100 * std:.1f}" if std else f"{100 * value:.1f}"


def task_row(task: str, metrics: dict, info: dict) -> dict[str, Any]:
    """A task's row of a report: its method, costs and MLflow run (``rows``, which every report has)."""
    return {"task": task, "method": info.get("method"), "mlflow_run_id": info.get("mlflow_run_id"),
            **{key: metrics[key] for key in PARAMETER_AND_THROUGHPUT_KEYS}, **memory_figures(metrics, info.get("memory_kind"))}


def cost_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the parameters and throughput over the rows, and each memory figure's maximum
    (``max_<figure>``, for the figures every row has)."""
    shared = [key for key in MEMORY_LABELS if all(key in r for r in rows)]
    return {"mean_trainable_params": statistics.fmean(r["trainable_params"] for r in rows),
            "mean_trainable_params_excl_head": statistics.fmean(r["trainable_params_excl_head"] for r in rows),
            **{f"max_{key}": max(r[key] for r in rows) for key in shared},
            "mean_images_per_s": statistics.fmean(r["images_per_s"] for r in rows),
            "methods": sorted({str(r["method"]) for r in rows})}


def memory_sentence(report: dict[str, Any]) -> str:
    """'maximum GPU peak allocated (MB): 812; maximum kept for backward (MB per batch): 44' (what the report has)."""
    keys = [measured_memory(report["rows"]), "saved_for_backward_mb"]
    return "; ".join(f"maximum {MEMORY_LABELS[key]}: {report[f'max_{key}']:.0f}" for key in keys
                     if f"max_{key}" in report)


def sentence_case(text: str) -> str:
    """The first letter upper case, the rest as it is (``str.capitalize`` would lower "MB" and "RSS")."""
    return text[:1].upper() + text[1:]


def plot_costs(row: dict[str, Any]) -> dict[str, Any]:
    """The cost columns of a ``plots/tasks.json`` row."""
    return {"params": row["trainable_params_excl_head"],
            **{key: round(row[key], 1) for key in MEMORY_LABELS if key in row},
            "images_s": round(row["images_per_s"], 1)}


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported when a report is drawn, not before)."""
    import matplotlib  # optional dependency (not in the lean install): imported only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency, after the backend is chosen

    return plt


def save_figure(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    pyplot().close(figure)


def finish_accuracy_figure(figure, axis, title: str, path: Path) -> None:
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)
