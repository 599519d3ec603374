"""The NOAH list-file layout that the few-shot and domain-generalisation protocols read.

A data set folder holds ``train_meta.list.num_shot_<k>.seed_<s>`` (one per shot count and seed),
``val_meta.list`` and ``test_meta.list``; the shot count and the seed pick a run's training list, and the seed
seeds the run too. Training lists are read with the few-shot augmentation, the others resized and centre-cropped,
all normalised as the backbone was pretrained.
"""
from __future__ import annotations

from pathlib import Path

from .base import Protocol, fingerprint

TARGET_PREFIX = "target:"  # the split "target:<domain>": that target domain's test list


class ListFileProtocol(Protocol):
    train = "train"
    scored = {"val": "val"}
    reported = {"val": "val", "test": "test"}

    # --- data ----------------------------------------------------------------------------------------------
    def split_list(self, task: str, split: str, shots: int | None = None, seed: int | None = None) -> Path:
        from ..data.few_shot import list_file  # torch-free schema: runtime import

        root = Path(self.config.data.root)
        if split.startswith(TARGET_PREFIX):
            return list_file(root, split[len(TARGET_PREFIX):], "test")
        return list_file(root, task, split, shots, seed)

    def input_name(self, task: str, split: str, path: Path) -> str:
        return f"{path.parent.parent.name}/{path.name}"  # oxford-pets/train_meta.list.num_shot_4.seed_0

    def num_classes(self, task: str) -> int:
        from ..data.few_shot import few_shot_num_classes  # torch-free schema: runtime import

        data = self.config.data
        return few_shot_num_classes(task, data.num_classes.get(task), Path(data.root) / task)

    def open_split(self, task: str, split: str, *, num_classes: int, img_size: int, shots: int | None = None,
                   seed: int | None = None, model=None):
        from ..data import FewShotDataset  # torch-free schema: runtime import

        root = Path(self.config.data.root)
        cfg = (getattr(model.family.backbone, "pretrained_cfg", None) or {}) if model is not None else {}
        normalise = {key: tuple(cfg[key]) for key in ("mean", "std") if key in cfg}
        if split.startswith(TARGET_PREFIX):
            return FewShotDataset(root, split[len(TARGET_PREFIX):], "test", img_size=img_size,
                                  num_classes=num_classes, **normalise)
        return FewShotDataset(root, task, split, shots=shots, seed=seed, img_size=img_size, num_classes=num_classes,
                              **normalise)

    def transform(self, image_size: int, normalisation: dict):
        from ..data.few_shot import few_shot_transform  # torch-free schema: runtime import

        return few_shot_transform(image_size, training=False, **normalisation)

    def list_record(self, task: str, checked: dict, targets: dict[str, dict] | None = None) -> dict:
        """The record of a data set (with its targets): lines per list, the smallest training list, classes, and
        a fingerprint of every list the task's runs read."""
        from ..data.vtab import task_group  # torch-free schema: runtime import

        data = self.config.data
        train = checked["train"]
        lists = [self.split_list(task, "train", int(k), int(s)) for k in train for s in train[k]]
        lists += [self.split_list(task, split) for split in ("val", "test")]
        lists += [self.split_list(task, f"{TARGET_PREFIX}{t}") for t in targets or {}]
        folder = Path(data.root) / task
        return {
            "task": task, "source": data.source, "root": data.root, "group": task_group(task, folder),
            "num_classes": checked["num_classes"], "classes_seen": checked.get("classes_seen", {}),
            "images": {"train": train, "val": checked.get("val"), "test": checked.get("test")},
            "train_images": min(n for per_seed in train.values() for n in per_seed.values()),
            "repeated_lines": checked.get("repeated_lines", {}),
            **({"targets": {t: {"test": entry["test"], "classes_seen": entry["classes_seen"]["test"]}
                            for t, entry in targets.items()}} if targets is not None else {}),
            "fingerprint": fingerprint(Path(data.root), lists + [folder / "meta.json"]),
        }

    def describe_record(self, record: dict) -> str:
        return (f"{len(record['images']['train'])} shot count(s), smallest training list {record['train_images']}, "
                + super().describe_record(record))

    # --- runs ----------------------------------------------------------------------------------------------
    def runs(self) -> list[tuple[int | None, int]]:
        return [(shots, seed) for shots in self.config.data.shots for seed in self.config.evaluation.seeds]

    def run_shots(self, shots: int | None) -> int | None:
        return max(self.config.data.shots) if shots is None else shots

    def training_split_words(self) -> str:
        return "smallest training list"

    def selection_objective(self) -> str:
        shots, seed = max(self.config.data.shots), self.config.evaluation.seeds[0]
        return f"val_meta.list accuracy after training on train_meta.list.num_shot_{shots}.seed_{seed}"
