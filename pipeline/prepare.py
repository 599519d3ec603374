"""Stage ``prepare``: make the task folders ready and write what they hold.

- ``data.source: synthetic``: generate the embedded suite (``dtl.data.generate_synthetic_suite``) under
  ``data.root``; a task folder generated earlier with the same settings is kept, one generated with other
  settings (e.g. a new ``data.num_test``) is regenerated, and a folder that the generator did not write is
  never touched (clear error instead).
  The protocol decides which suite: the VTAB-like tasks, the few-shot data sets
  (``dtl.data.synthetic_few_shot``) or the domain-shift source and targets (``dtl.data.synthetic_domain_shift``).
- ``data.source: vtab1k`` / ``few_shot`` / ``domain_generalization``: check every list file of the folder (and
  decode every listed image once); a missing or broken task is one error listing everything that is wrong.

Then it counts images and classes per list and writes ``outputs/prepare/<task>.json`` (one per task, with a
fingerprint of the task's list files; a domain-generalisation source's record covers its targets too) and
``outputs/prepare/manifest.json`` (all tasks). The data itself is not a DVC output (a data folder is the user's);
after editing it in place, run ``dvc repro -f -s prepare`` and then ``dvc repro``: only the tasks whose
fingerprint changed are retrained.

Usage: ``python -m pipeline.prepare [--params params.yaml] [--best sweeps/best.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dtl.cache import default_cache_dir
from dtl.config import load_config
from dtl.experiment import check_run
from dtl.io import atomic_dir, write_json

from .outputs import OutputPaths
from .params import check_dvc_entries
from .stage import StageError, run_stage, stage_arguments


def generate_synthetic(config) -> None:
    """Generate the protocol's embedded suite (VTAB-like tasks, few-shot data sets or domains) under ``data.root``."""
    data = config.data
    root = Path(data.root)
    suite = config.protocol.synthetic_suite()
    unknown = [name for name in suite.names if name not in suite.known]
    if unknown:
        raise StageError(f"{suite.key}: {', '.join(unknown)} are not {suite.what}; with data.source: synthetic use "
                         f"some of {', '.join(suite.known)} (or set data.source to the folder's layout)")
    settings = dict(image_size=data.image_size or 32, num_test=data.num_test, seed=data.generator_seed)
    for name in suite.names:
        try:  # keeps a folder generated earlier with the same settings
            suite.generate(root, [name], **settings)
        except FileExistsError:
            if not generated_by_us(root / name):
                raise StageError(f"{root / name} exists but was not written by the synthetic generator; move it "
                                 "away or point data.root elsewhere") from None
            print(f"prepare: {name}: settings changed (data.*), regenerating {root / name}", flush=True)
            suite.generate(root, [name], overwrite=True, **settings)


def generated_by_us(folder: Path) -> bool:
    """Whether ``folder`` was written by dtl's synthetic generator (so regenerating it loses nothing)."""
    try:
        return json.loads((folder / "meta.json").read_text()).get("generator") == "dtl.data.synthetic"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def verified_images_file(root: Path) -> Path:
    """Where the images of ``root`` that decoded are remembered (by size and modification time), next to the
    prefix cache, so a later ``prepare`` decodes only new or changed files."""
    key = hashlib.blake2b(str(root.resolve()).encode(), digest_size=8).hexdigest()
    return default_cache_dir().parent / "checked_images" / f"{key}.json"


def check_folders(config, root: Path) -> dict[str, dict]:
    """Check every list (and, for folders of the user's own, decode every image) the protocol reads; all
    problems at once. Returns the task records."""
    protocol = config.protocol
    checked = protocol.check_data(verify_images=config.data.source != "synthetic",
                                  verified=verified_images_file(root), progress=True)
    return protocol.task_records(checked)


def prepare(params_path: Path, best_path: Path, outputs: Path) -> dict[str, Any]:
    config = load_config(params_path, best_path)
    check_dvc_entries(params_path, best_path, config.data.tasks)
    data = config.data
    root = Path(data.root)
    protocol = config.protocol
    if data.source == "synthetic":
        generate_synthetic(config)
    elif not root.is_dir():
        raise StageError(f"data.root: {data.source} folder {root.resolve()} does not exist; point data.root at the "
                         "folder holding one sub-folder per task")
    records = check_folders(config, root)
    for task, record in records.items():  # every task's settings, before any train stage starts
        check_run(config, task, record["train_images"], record["num_classes"])

    paths = OutputPaths(outputs)
    manifest = {"source": data.source, "root": data.root, "protocol": protocol.name, "tasks": records,
                **protocol.manifest_totals(records)}
    with atomic_dir(paths.prepare_dir) as staging:
        for task, record in records.items():
            write_json(staging / f"{task}.json", record)
        write_json(staging / "manifest.json", manifest)
    for task, record in records.items():
        print(f"prepare: {task:<22} {record['group']:<12} {record['num_classes']:>4} classes | "
              f"{protocol.describe_record(record)}")
        for target, counts in record.get("targets", {}).items():
            print(f"prepare:   target {target:<20} test {counts['test']}, {counts['classes_seen']} classes")
        for name, repeats in record.get("repeated_lines", {}).items():
            print(f"prepare:   note: {name} repeats {repeats} line(s); they are kept, as the official loader "
                  "reads every line")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage prepare: generate or check the task folders, write a manifest.",
                           task=False).parse_args(argv)
    run_stage("prepare", lambda: prepare(args.params, args.best, args.outputs),
              output=OutputPaths(args.outputs).prepare_dir)


if __name__ == "__main__":
    main()
