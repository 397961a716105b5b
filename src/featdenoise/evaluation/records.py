"""Per-image record files of an evaluation folder (see :mod:`featdenoise.evaluation.engine`).

``parts/outcomes-rank<R>.jsonl`` gets one JSON line per image and attack as soon as that attack is
done on that batch (flushed and fsynced, so a kill loses nothing written); :func:`load_records`
merges the lines of one image in file order; ``outcomes.jsonl`` holds the merged records of a
finished evaluation, in evaluation order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from featdenoise.runtime.atomic import atomic_write, own_json, own_png, own_text
from featdenoise.runtime.outdir import LOCK_FILE, own_folder

SETTINGS_FILE = "settings.json"
OUTCOMES_FILE = "outcomes.jsonl"
SUMMARY_FILE = "summary.json"
PARTS_DIR = "parts"


def is_own_records(path: str) -> bool:
    """A JSONL file of per-image records (every line an object with an ``index``; a line cut
    short by an interruption is allowed), or a temporary file of one being written."""
    if ".tmp." in os.path.basename(path):
        return os.path.isfile(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for line in lines:
        try:
            record = json.loads(line) if line.strip() else {"index": None}
            ok = isinstance(record, dict) and "index" in record
        except ValueError:
            ok = line.startswith("{")  # a line cut short by an interruption
        if not ok:
            return False
    return True


def _own_table(path: str) -> bool:
    return own_text("| model |")(path) or own_text("| attacker |")(path)


# Files the engine writes into an evaluation folder, each with how it is recognised as ours
# (restart=True removes them, after checking every one).
OWN_FILES = {SETTINGS_FILE: own_json(), OUTCOMES_FILE: is_own_records, SUMMARY_FILE: own_json(),
             PARTS_DIR: own_folder(is_own_records), "table.md": _own_table,
             "accuracy_vs_iterations.png": own_png}



def _read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file; a line cut short by an interruption is dropped."""
    out: list[dict] = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # partially written last line of an interrupted run
    return out


def load_records(out_dir: str) -> dict[int, dict]:
    """Every per-image record in ``out_dir`` (merged file and per-rank parts), by image index.

    Partial lines of one image (one per column) are merged in file order.
    """
    records: dict[int, dict] = {}
    paths = [os.path.join(out_dir, OUTCOMES_FILE)]
    parts = os.path.join(out_dir, PARTS_DIR)
    if os.path.isdir(parts):
        paths += [os.path.join(parts, p) for p in sorted(os.listdir(parts)) if p.endswith(".jsonl")]
    for path in paths:
        for r in _read_jsonl(path):
            records.setdefault(int(r["index"]), {}).update(r)
    return records


def append_records(path: str, records: Sequence[dict]) -> None:
    """Append records as JSON lines and push them to disk (flush + fsync): a kill loses none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, written atomically."""
    with atomic_write(path, ours=own_json()) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_outcomes(out_dir: str, records: Sequence[dict]) -> None:
    """The merged ``outcomes.jsonl`` (one line per image, in evaluation order)."""
    with atomic_write(os.path.join(out_dir, OUTCOMES_FILE)) as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def is_own_evaluation(path: str) -> bool:
    """A folder holding nothing but an evaluation's own files (:data:`OWN_FILES`, each
    recognised by its content, and lock files): one that may be deleted as a whole."""
    if not os.path.isdir(path):
        return False
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        ours = OWN_FILES.get(name)
        if not (ours(entry) if ours is not None else
                name.startswith(LOCK_FILE) and os.path.isfile(entry)):
            return False
    return True
