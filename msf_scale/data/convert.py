"""iMiGUE and SMG annotations -> the packer's CSV (`path,label,subject,split,start,end`, one row per segment).

    msf-scale data convert imigue --annotations iMiGUE/ --out imigue.csv [--video '{sample}.mp4']
    msf-scale data convert smg --annotations SMG/experimentWell --out smg.csv [--video '{sample}/{sample}_color.mp4']
    msf-scale data pack --videos VIDEOS --annotations imigue.csv --out data/imigue --frames 32 --size 224 --format mp4

The layouts are those the datasets' own loaders read (github.com/mikecheninoulu/SMG, classification/):

* iMiGUE (MiGA release): one folder per video, `<id>/<id>_label.csv`, rows `class_id,start,end` (no header); frames
  0-based with `end` inclusive; class ids 1..31 and 99 (the non-micro-gesture class), which their loader makes 32.
  Folders sit under split folders (`imigue_skeleton_train`, `imigue_skeleton_validate`; any name containing
  `train` / `val` / `test`), which give the cross-subject split; without them the packer splits by subject.
* SMG: one folder per participant, `Sample0001/Sample0001_finelabels.csv`, rows `class_id,start,end`; class ids
  1..17; frames 0-based, `end` exclusive. The cross-subject protocol of their classification code tests on
  participants 36-40 (`--test-subjects`).

Labels become 0-based indices (class_id - 1), or the names of `--class-names FILE` (one per line, in id order).
The video of each annotation folder is found with the `--video` template ({sample} = the folder name), relative to
the directory passed to `msf-scale data pack --videos`; a missing video is the packer's to report (rejected.csv).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from msf_scale.config import ConfigError, UserPathError

COLUMNS = ["path", "label", "subject", "split", "start", "end"]
IMIGUE_NON_MG_ID, IMIGUE_NON_MG_CLASS = 99, 32   # as their GestureSample maps it
SMG_TEST_SUBJECTS = "36-40"


def _rows(path: Path) -> list[tuple[int, int, int]]:
    """(class_id, start, end) of an annotation CSV without header; blank lines skipped."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            gid, start, end = (int(float(p)) for p in parts[:3])
        except ValueError:
            raise ConfigError(f"{path}:{n}: expected class_id,start,end, got {line!r}") from None
        out.append((gid, start, end))
    return out


def _split_of(folder: Path) -> str:
    name = folder.name.lower()
    if "train" in name:
        return "train"
    if "val" in name or "test" in name:
        return "test"
    return ""


def _label(class_id: int, names: list[str] | None, where: str) -> str:
    if class_id < 1 or (names is not None and class_id > len(names)):
        raise ConfigError(f"{where}: class id {class_id} outside 1..{len(names) if names else 'N'}")
    return names[class_id - 1] if names else str(class_id - 1)


def convert_imigue(root: str | Path, video: str = "{sample}.mp4", names: list[str] | None = None) -> list[dict]:
    rows = []
    for label_csv in sorted(Path(root).rglob("*_label.csv")):
        sample = label_csv.parent.name
        if label_csv.name != f"{sample}_label.csv":
            continue
        split = _split_of(label_csv.parent.parent)
        for gid, start, end in _rows(label_csv):
            gid = IMIGUE_NON_MG_CLASS if gid == IMIGUE_NON_MG_ID else gid
            rows.append({"path": video.format(sample=sample), "label": _label(gid, names, str(label_csv)),
                         "subject": sample, "split": split, "start": start, "end": end + 1})   # inclusive end
    return rows


def _subjects(spec: str) -> set[int]:
    out = set()
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise ConfigError(f"--test-subjects {spec!r}: expected numbers and ranges like 36-40,12")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def convert_smg(root: str | Path, video: str = "{sample}/{sample}_color.mp4", names: list[str] | None = None,
                test_subjects: str = SMG_TEST_SUBJECTS) -> list[dict]:
    test, rows = _subjects(test_subjects), []
    for label_csv in sorted(Path(root).rglob("Sample*_finelabels.csv")):
        sample = label_csv.parent.name
        m = re.fullmatch(r"Sample(\d+)", sample)
        if not m or label_csv.name != f"{sample}_finelabels.csv":
            continue
        split = "test" if int(m.group(1)) in test else "train"
        for gid, start, end in _rows(label_csv):
            rows.append({"path": video.format(sample=sample), "label": _label(gid, names, str(label_csv)),
                         "subject": sample, "split": split, "start": start, "end": end})
    return rows


def convert(dataset: str, annotations: str | Path, out: str | Path, video: str | None = None,
            class_names: str | Path | None = None, test_subjects: str = SMG_TEST_SUBJECTS) -> int:
    """Write the packer CSV for `dataset` (imigue | smg); returns the number of segments."""
    root = Path(annotations)
    if not root.is_dir():
        raise UserPathError(f"--annotations {root} is not a directory")
    names = None
    if class_names is not None:
        p = Path(class_names)
        if not p.is_file():
            raise UserPathError(f"--class-names {p} does not exist")
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if dataset == "imigue":
        rows = convert_imigue(root, video or "{sample}.mp4", names)
    elif dataset == "smg":
        rows = convert_smg(root, video or "{sample}/{sample}_color.mp4", names, test_subjects)
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; choose imigue or smg")
    if not rows:
        pattern = "<id>/<id>_label.csv" if dataset == "imigue" else "SampleNNNN/SampleNNNN_finelabels.csv"
        raise UserPathError(f"no {pattern} under {root}: point --annotations at the release's annotation folders")
    if all(r["split"] == "" for r in rows):
        for r in rows:
            del r["split"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in COLUMNS if c in rows[0]])
        w.writeheader()
        w.writerows(rows)
    return len(rows)
