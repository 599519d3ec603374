"""Stage ``prepare``: make the task folders ready and write what they hold.

- ``data.source: synthetic``: generate the embedded suite (``dtl.data.generate_synthetic_suite``) under
  ``data.root``; a task folder generated earlier with the same settings is kept, one generated with other
  settings (e.g. a new ``data.num_test``) is regenerated, and a folder that the generator did not write is
  never touched (clear error instead).
- ``data.source: vtab1k``: check every task folder and list file of a VTAB-1K root
  (``dtl.data.check_vtab_root``); a missing or broken task is one error listing everything that is wrong.

Then both count images and classes per split and write ``outputs/prepare/<task>.json`` (one per task, with a
fingerprint of the task's list files) and ``outputs/prepare/manifest.json`` (all tasks). The data itself is not a
DVC output (a VTAB-1K folder is the user's); after editing it in place, run ``dvc repro -f -s prepare`` and then
``dvc repro``: only the tasks whose fingerprint changed are retrained.

Usage: ``python -m pipeline.prepare [--params params.yaml] [--best sweeps/best.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dtl.config import load_config
from dtl.io import write_json

from .params import check_dvc_entries
from .stage import OutputPaths, StageError, atomic_dir, run_stage, stage_arguments

LIST_SPLITS = ("train800", "val200", "train800val200", "test")


def generate_synthetic(root: Path, tasks: list[str], image_size: int, num_test: int, seed: int) -> None:
    from dtl.data import SYNTHETIC_TASKS, generate_synthetic_suite

    unknown = [task for task in tasks if task not in SYNTHETIC_TASKS]
    if unknown:
        raise StageError(f"data.tasks: {', '.join(unknown)} are not synthetic tasks; with data.source: synthetic "
                         f"use some of {', '.join(SYNTHETIC_TASKS)} (or set data.source: vtab1k)")
    for task in tasks:
        try:  # keeps a folder generated earlier with the same settings
            generate_synthetic_suite(root, tasks=[task], image_size=image_size, num_test=num_test, seed=seed)
        except FileExistsError:
            if not generated_by_us(root / task):
                raise StageError(f"{root / task} exists but was not written by the synthetic generator; move it "
                                 "away or point data.root elsewhere") from None
            print(f"prepare: {task}: settings changed (data.*), regenerating {root / task}", flush=True)
            generate_synthetic_suite(root, tasks=[task], image_size=image_size, num_test=num_test, seed=seed,
                                     overwrite=True)


def generated_by_us(folder: Path) -> bool:
    """Whether ``folder`` was written by dtl's synthetic generator (so regenerating it loses nothing)."""
    try:
        return json.loads((folder / "meta.json").read_text()).get("generator") == "dtl.data.synthetic"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def task_group(task: str, folder: Path) -> str:
    from dtl.data import TASK_GROUPS

    meta = folder / "meta.json"
    if meta.is_file():
        group = json.loads(meta.read_text()).get("group")
        if group:
            return str(group)
    for group, tasks in TASK_GROUPS.items():
        if task in tasks:
            return group
    return "Other"


def task_record(root: Path, task: str, checked: dict[str, int], source: str, root_as_given: str) -> dict[str, Any]:
    """Counts and classes (from ``check_vtab_root``), group and a fingerprint of one checked task folder."""
    folder = root / task
    digest = hashlib.sha256()
    for split in LIST_SPLITS:
        digest.update(split.encode() + b"\0" + (folder / f"{split}.txt").read_bytes())
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        digest.update(b"meta\0" + meta_path.read_bytes())
    return {
        "task": task,
        "source": source,
        "root": root_as_given,
        "group": task_group(task, folder),
        "num_classes": checked["num_classes"],
        "classes_seen": checked["classes_seen"],
        "images": {split: checked[split] for split in LIST_SPLITS},
        "fingerprint": digest.hexdigest(),
    }


def verified_images_file(root: Path) -> Path:
    """Where the images of ``root`` that decoded are remembered (by size and modification time), next to the
    prefix cache, so a later ``prepare`` decodes only new or changed files."""
    from dtl.cache import default_cache_dir

    key = hashlib.blake2b(str(root.resolve()).encode(), digest_size=8).hexdigest()
    return default_cache_dir().parent / "checked_images" / f"{key}.json"


def prepare(params_path: Path, best_path: Path, outputs: Path) -> dict[str, Any]:
    from dtl.data import check_vtab_root
    from dtl.experiment import PROTOCOLS, check_run

    config = load_config(params_path, best_path)
    check_dvc_entries(params_path, best_path, config.data.tasks)
    data = config.data
    root = Path(data.root)
    if data.source == "synthetic":
        generate_synthetic(root, data.tasks, data.image_size or 32, data.num_test, data.generator_seed)
    elif not root.is_dir():
        raise StageError(f"data.root: VTAB-1K folder {root.resolve()} does not exist (data.source: vtab1k); "
                         "point data.root at the folder holding one sub-folder per task")
    # every list, label and image (decoded, for folders of the user's own), all problems at once
    checked = check_vtab_root(root, data.tasks, num_classes=data.num_classes, verify_images=data.source == "vtab1k",
                              verified=verified_images_file(root), progress=True)
    records = {task: task_record(root, task, checked[task], data.source, data.root) for task in data.tasks}
    for task, record in records.items():  # every task's settings, before any train stage starts
        train_split = PROTOCOLS[config.for_task(task).evaluation.protocol].train
        check_run(config, task, record["images"][train_split], record["num_classes"])

    paths = OutputPaths(outputs)
    manifest = {"source": data.source, "root": data.root, "tasks": records,
                "total_images": {split: sum(r["images"][split] for r in records.values()) for split in LIST_SPLITS}}
    with atomic_dir(paths.prepare_dir) as staging:
        for task, record in records.items():
            write_json(staging / f"{task}.json", record)
        write_json(staging / "manifest.json", manifest)
    for task, record in records.items():
        images = ", ".join(f"{split} {n}" for split, n in record["images"].items())
        print(f"prepare: {task:<22} {record['group']:<12} {record['num_classes']:>4} classes | {images}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage prepare: generate or check the task folders, write a manifest.",
                           task=False).parse_args(argv)
    run_stage("prepare", lambda: prepare(args.params, args.best, args.outputs),
              output=OutputPaths(args.outputs).prepare_dir)


if __name__ == "__main__":
    main()
