"""The data audit: duplicates, leaks across splits, suspect labels and outliers, from a run's cached features.

:func:`run_audit` is the stage; :func:`write_audit` writes its three CSV files into a run folder. The rules and
file formats are in docs/audit.md.
"""

from pipeline.audit.output import AUDIT_FILES, write_audit
from pipeline.audit.run import Audit, AuditConfig, AuditImages, AuditSource, run_audit

__all__ = ["Audit", "AuditConfig", "AuditImages", "AuditSource", "run_audit", "write_audit", "AUDIT_FILES"]
