"""List files (``relative/path/to/image <integer label>`` per line), the one format of every data set here.

VTAB-1K, the few-shot data sets and the domain-generalisation domains all name their images in such lists.
Reading one reports each problem with its file and line; a root's check collects every problem and raises one
:class:`DataError` holding them all, after decoding the listed images once if asked.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

from PIL import Image
from tqdm.auto import tqdm

from ..io import write_json

LINE_FORMAT = "'relative/path/to/image <integer label>'"


# Per list file, at most this many problems are spelled out; the rest are counted.
_MAX_PROBLEMS_PER_FILE = 50


class DataError(ValueError):
    """A VTAB folder, list file or image is missing or malformed; the message names the file and line."""


# A problem found in a file: (the file, the full message naming it and the line).
Problem = tuple[Path, str]


def parse_list(path: Path, num_classes: int) -> tuple[list[tuple[Path, int]], list[int], list[Problem]]:
    """Parse a list file into (image path, label) samples with their line numbers, and the problems found.

    The label is split off at the LAST whitespace, so image paths may contain spaces. Blank lines are skipped.
    """
    samples: list[tuple[Path, int]] = []
    line_numbers: list[int] = []
    problems: list[Problem] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return samples, line_numbers, [(path, f"{path}: cannot read the list file ({err})")]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2:
            problems.append((path, f"{path}:{number}: expected {LINE_FORMAT}, got {line!r}"))
            continue
        try:
            label = int(parts[1])
        except ValueError:
            problems.append((path, f"{path}:{number}: the label {parts[1]!r} is not an integer "
                                   f"(expected {LINE_FORMAT})"))
            continue
        if not 0 <= label < num_classes:
            problems.append((path, f"{path}:{number}: label {label} is outside [0, {num_classes}) for this task"))
            continue
        samples.append((path.parent / parts[0], label))
        line_numbers.append(number)
    return samples, line_numbers, problems


def summarise(problems: list[Problem], header: str) -> str:
    """One message listing the problems (the first ``_MAX_PROBLEMS_PER_FILE`` of each file, the rest counted)."""
    shown: list[str] = []
    per_file: Counter[Path] = Counter()
    for source, message in problems:
        per_file[source] += 1
        if per_file[source] <= _MAX_PROBLEMS_PER_FILE:
            shown.append(message)
    for source, count in per_file.items():
        if count > _MAX_PROBLEMS_PER_FILE:
            shown.append(f"{source}: ... and {count - _MAX_PROBLEMS_PER_FILE} more problems in this file")
    return header + "\n  " + "\n  ".join(shown)


def check_list(path: Path, num_classes: int, problems: list[Problem], images: dict[Path, str] | None = None,
               locate: Callable[[Path], Path] | None = None) -> list[tuple[Path, int]] | None:
    """Check one list file of a root, appending its problems: format and labels, that every listed image exists
    (``locate`` maps a parsed path to where the image is, if not next to the list) and that the list is not
    empty. Existing images are remembered in ``images`` (image -> ``file:line``) for decoding. Returns the parsed
    samples, or None when the file does not exist."""
    if not path.is_file():
        problems.append((path, f"{path}: list file does not exist"))
        return None
    samples, numbers, file_problems = parse_list(path, num_classes)
    problems.extend(file_problems)
    if locate is not None:
        samples = [(locate(image), label) for image, label in samples]
    for (image, _), number in zip(samples, numbers):
        if not image.is_file():
            problems.append((path, f"{path}:{number}: image {image} does not exist"))
        elif images is not None:
            images.setdefault(image, f"{path}:{number}")
    if not samples and not file_problems:
        problems.append((path, f"{path}: the list file is empty"))
    return samples


def raise_problems(root: Path, problems: list[Problem], images: Mapping[Path, str], verify_images: bool,
                   verified: str | os.PathLike[str] | None, progress: bool) -> None:
    """The end of a root's check: decode the listed ``images`` if asked, then raise ONE :class:`DataError`
    holding every problem found, if any."""
    if verify_images:
        problems += unreadable_images(images, verified, progress)
    if problems:
        raise DataError(summarise(problems, f"{root}: {len(problems)} problem(s) found"))


def _decode(path: Path) -> str | None:
    """None if ``path`` decodes to an RGB image (as training reads it), else why not."""
    try:
        with Image.open(path) as image:
            image.load()
            image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def unreadable_images(images: Mapping[Path, str], verified: str | os.PathLike[str] | None = None,
                      progress: bool = False) -> list[Problem]:
    """Decode every image once, in parallel, and return a problem (naming the list file and line) for each one
    that does not decode: a truncated JPEG, a text file named ``.jpg``... ``verified`` is a JSON file remembering
    the images that decoded, by size and modification time, so a later check reads only new or changed files."""
    known: dict[str, list[int]] = {}
    if verified is not None and Path(verified).is_file():
        try:
            known = json.loads(Path(verified).read_text())
        except (OSError, ValueError):
            known = {}
    stamps = {}
    for path in images:
        stat = path.stat()
        stamps[path] = [stat.st_size, stat.st_mtime_ns]
    todo = [path for path in images if known.get(str(path.resolve())) != stamps[path]]
    problems: list[Problem] = []
    workers = min(32, 2 * (os.cpu_count() or 1))  # decoding releases the GIL for most of its work
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_decode, todo)
        # disable=None: a bar on a terminal only (in a log, a bar is one long line of carriage returns)
        for path, error in tqdm(zip(todo, results), total=len(todo), desc="checking images", unit="image",
                                disable=True if not progress or not todo else None, mininterval=2):
            if error is None:
                known[str(path.resolve())] = stamps[path]
            else:
                where = images[path]
                problems.append((Path(where.rsplit(":", 1)[0]), f"{where}: cannot read image {path} ({error})"))
    if verified is not None and todo:
        write_json(verified, known, indent=0)
    return problems
