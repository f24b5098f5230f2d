"""The store's exceptions: catch `StoreError` for all of them, or one subclass for one case."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class NotFound(StoreError, LookupError):
    """No such row (or the row is hidden, e.g. a retired version looked up by name)."""


class InvalidVersionName(StoreError, ValueError):
    """A version name that is reserved ("base", "latest") or not of the allowed form."""


class DuplicateVersionName(StoreError):
    """A version of that name exists already (retired versions keep their names)."""

    def __init__(self, name: str):
        super().__init__(f"a version named {name!r} already exists")
        self.name = name


class VersionHasChildren(StoreError):
    """Retiring a version that still has live children, without `cascade`."""

    def __init__(self, name: str, children: list[str]):
        super().__init__(
            f"version {name!r} has live children ({', '.join(children)}); "
            "retire them first or retire with cascade"
        )
        self.name = name
        self.children = children


class VersionInExperiment(StoreError):
    """Retiring a version that an arm of a running experiment serves: its users would get 404s."""

    def __init__(self, name: str, experiments: list[str]):
        super().__init__(
            f"version {name!r} is an arm of running experiments ({', '.join(experiments)}); "
            "stop them first (POST /v1/experiments/NAME/stop, naming the winner)"
        )
        self.name = name
        self.experiments = experiments


class InvalidCursor(StoreError, ValueError):
    """A pagination cursor that this store did not hand out."""


class JobNotRunning(StoreError):
    """A job that is not (or no longer, or in another attempt) `running` was asked to succeed."""

    def __init__(self, job_id: str, status: str, attempts: int):
        super().__init__(f"job {job_id} is {status} (attempt {attempts}), not running")
        self.job_id = job_id
        self.status = status
        self.attempts = attempts


class DeltaChecksumError(StoreError):
    """A delta blob whose bytes do not hash to the sha256 recorded when it was written."""

    def __init__(self, version: str, param: str, expected: str, actual: str):
        super().__init__(
            f"delta of version {version!r} for {param!r} is corrupt: sha256 {actual[:16]}... "
            f"!= recorded {expected[:16]}..."
        )
        self.version = version
        self.param = param


class BaseFingerprintMismatch(StoreError):
    """A version made for another base model than the one the caller has loaded."""

    def __init__(self, version: str, expected: str, actual: str):
        super().__init__(
            f"version {version!r} was made for base fingerprint {actual[:16]}..., "
            f"the loaded base is {expected[:16]}..."
        )
        self.version = version


class InvalidCorpusName(StoreError, ValueError):
    """A corpus name that is reserved, of the wrong form, or shaped like a corpus id."""


class DuplicateCorpusName(StoreError):
    """A corpus of that name exists already."""

    def __init__(self, name: str):
        super().__init__(f"a corpus named {name!r} already exists")
        self.name = name


class CorpusInUse(StoreError):
    """Deleting a corpus that a queued or running job still needs."""

    def __init__(self, corpus: str, jobs: list[str]):
        shown = ", ".join(jobs[:3]) + (f" and {len(jobs) - 3} more" if len(jobs) > 3 else "")
        super().__init__(
            f"corpus {corpus!r} is used by queued or running job(s) {shown}; "
            "cancel them or wait for them to finish"
        )
        self.corpus = corpus
        self.jobs = jobs


class CorruptCorpus(StoreError):
    """A stored corpus whose content does not match its checksum, or no longer parses."""


class DuplicateExperimentName(StoreError):
    """An experiment of that name exists already (stopped ones keep their names)."""

    def __init__(self, name: str):
        super().__init__(f"an experiment named {name!r} already exists")
        self.name = name


class ExperimentStopped(StoreError):
    """Stopping an experiment that is stopped already."""

    def __init__(self, name: str):
        super().__init__(f"experiment {name!r} is stopped already")
        self.name = name
