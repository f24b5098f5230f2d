"""Request and response bodies of the API, one module per entity (Create / Public / list wrapper).

Public models are built from store rows by `from_row`; what is not in them (a job's spec, its
idempotency key and worker, delta blobs, key hashes) never leaves the server. The job spec itself
(`POST /v1/jobs`) is `app.job_spec`, which the workers read stored jobs with too.
"""

from __future__ import annotations

from app.api.schemas.corpora import CorpusList, CorpusPublic
from app.api.schemas.experiments import (
    ArmDifference,
    ArmResult,
    ArmSpec,
    Difference,
    ExperimentCreate,
    ExperimentList,
    ExperimentPublic,
    ExperimentResults,
    ExperimentStop,
    Feedback,
    FeedbackRecorded,
    FeedbackSummary,
    Latency,
    Outcome,
    OutcomeList,
    Rate,
)
from app.api.schemas.health import CheckResult, Readiness
from app.api.schemas.jobs import JobList, JobPublic, JobStatus
from app.api.schemas.keys import KeyCreate, KeyCreated, KeyList, KeyPublic, Role
from app.api.schemas.versions import DeltaPublic, ExportFormat, VersionList, VersionPublic

__all__ = [
    "ArmDifference",
    "ArmResult",
    "ArmSpec",
    "CheckResult",
    "CorpusList",
    "CorpusPublic",
    "DeltaPublic",
    "Difference",
    "ExperimentCreate",
    "ExperimentList",
    "ExperimentPublic",
    "ExperimentResults",
    "ExperimentStop",
    "ExportFormat",
    "Feedback",
    "FeedbackRecorded",
    "FeedbackSummary",
    "JobList",
    "JobPublic",
    "JobStatus",
    "KeyCreate",
    "KeyCreated",
    "KeyList",
    "KeyPublic",
    "Latency",
    "Outcome",
    "OutcomeList",
    "Rate",
    "Readiness",
    "Role",
    "VersionList",
    "VersionPublic",
]
