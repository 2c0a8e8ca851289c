"""Every state in the service, defined once: experiments, trials and Ray jobs.

The database stores these values as strings, the REST API publishes them as enums, and the
lifecycle, CRUD, driver and CLI compare against these members, never against literals. This
module imports nothing heavy, so the CLI can use it and still answer ``--help`` at once.
"""

from __future__ import annotations

from enum import StrEnum


class ExperimentStatus(StrEnum):
    """An experiment's place in its lifecycle (see :data:`TRANSITIONS`)."""

    QUEUED = "queued"  # stored, not yet launched on Ray (or launching is being retried)
    SUBMITTED = "submitted"  # the Ray job exists; its driver has not started the trials
    RUNNING = "running"  # the job's driver runs the trials
    CANCELLING = "cancelling"  # asked to stop; the job is stopping
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_EXPERIMENT

    @property
    def wants_no_job(self) -> bool:
        """Ended or being cancelled: a Ray job of it that starts or was just submitted must
        train nothing and stop."""
        return self.terminal or self == ExperimentStatus.CANCELLING


class TrialState(StrEnum):
    """One trial's state; a terminal state never changes again."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_TRIAL


class JobStatus(StrEnum):
    """A Ray job's status, as the Jobs API reports it."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def live(self) -> bool:
        return self in (JobStatus.PENDING, JobStatus.RUNNING)


TERMINAL_EXPERIMENT = frozenset(
    {ExperimentStatus.SUCCEEDED, ExperimentStatus.FAILED, ExperimentStatus.CANCELLED}
)
LIVE_EXPERIMENT = tuple(s for s in ExperimentStatus if s not in TERMINAL_EXPERIMENT)
TERMINAL_TRIAL = frozenset({TrialState.SUCCEEDED, TrialState.FAILED, TrialState.CANCELLED})
UNFINISHED_TRIAL = (TrialState.PENDING, TrialState.RUNNING)

_E = ExperimentStatus
TRANSITIONS: dict[ExperimentStatus, frozenset[ExperimentStatus]] = {
    _E.QUEUED: frozenset({_E.SUBMITTED, _E.RUNNING, _E.CANCELLED, _E.FAILED}),
    _E.SUBMITTED: frozenset({_E.RUNNING, _E.CANCELLING, _E.SUCCEEDED, _E.FAILED, _E.CANCELLED}),
    _E.RUNNING: frozenset({_E.CANCELLING, _E.SUCCEEDED, _E.FAILED, _E.CANCELLED}),
    _E.CANCELLING: frozenset({_E.CANCELLED, _E.FAILED}),
}
