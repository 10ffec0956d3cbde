"""The audit's files in a run folder: ``audit/duplicates.csv``, ``audit/label_issues.csv``, ``audit/outliers.csv``.

Each is ranked most suspicious first, with image paths relative to the dataset root as everywhere in a run folder,
and written to a temporary name first, so a crash never leaves a file that looks complete (formats in
docs/audit.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.audit.run import Audit
from pipeline.results import AUDIT_COLUMNS, write_csv

__all__ = ["AUDIT_FILES", "write_audit"]

AUDIT_FILES = {"duplicates": "audit/duplicates.csv", "label_issues": "audit/label_issues.csv",
               "outliers": "audit/outliers.csv"}
"""Where each file lives, relative to the run folder."""


def write_audit(run_dir: Path, audit: Audit) -> dict[str, str]:
    """Write the three files into ``run_dir`` and return :data:`AUDIT_FILES`."""
    im = audit.images
    names = list(im.class_names)
    paths, splits, labels = im.paths, im.splits, im.labels

    def where(r: int) -> list[Any]:
        return [paths[r], str(splits[r]), names[int(labels[r])]]

    write_csv(run_dir / AUDIT_FILES["duplicates"], AUDIT_COLUMNS["duplicates"],
           ([d["cluster"], *where(int(d["row"])), paths[int(d["nearest_row"])], f"{float(d['distance']):.6f}",
             d["kind"]] for d in audit.duplicates.rows))
    write_csv(run_dir / AUDIT_FILES["label_issues"], AUDIT_COLUMNS["label_issues"],
           ([*where(int(r)), names[int(s)], f"{float(v):.6f}"]
            for r, s, v in zip(audit.label_rows, audit.suggested, audit.label_scores)))
    flagged = [int(r) for r in audit.outlier_rows if audit.outlier_score[r] > audit.fence]
    write_csv(run_dir / AUDIT_FILES["outliers"], AUDIT_COLUMNS["outliers"],
           ([*where(r), f"{float(audit.outlier_score[r]):.6f}"] for r in flagged))
    return dict(AUDIT_FILES)
