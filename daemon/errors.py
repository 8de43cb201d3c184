"""Every error lstmd raises on purpose, so callers catch ours and nothing else.

Start-up errors (configuration, model) end the process with exit code 2; record
errors become dead-letter records and never stop the daemon.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """What an lstmd process exits with: the command line's and the pod supervisor's
    one list (Kubernetes and scripts read them)."""

    OK = 0
    ERROR = 1  # anything unexpected; the pod restarts
    STARTUP = 2  # cannot start as configured: no connection made


class LstmdError(Exception):
    """Base of every error lstmd raises on purpose."""


class StartupError(LstmdError):
    """The daemon cannot start as configured: exit code 2, no connection made."""

    exit_code = ExitCode.STARTUP


class ConfigError(StartupError):
    """One or more LSTMD_* variables are missing or invalid; the message names each."""


class UnservableModelError(StartupError):
    """The model file cannot be served statefully one step at a time."""


class MissingDependencyError(StartupError):
    """A feature asked for needs an optional extra this installation lacks (the
    message names the install command): refused before any work is done."""


class RecordRejected(LstmdError):
    """An input record that cannot be applied; it goes to the dead-letter topic.

    `reason` is a short stable label (a metric label value and the DLQ header
    `lstmd.error.class`); the message is the human-readable detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class KafkaSetupError(StartupError):
    """Kafka is reachable but unusable as configured (missing topic, authorization)."""
