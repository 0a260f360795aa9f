"""The ways a run ends early, shared by every module: how `common.main` reports each is fixed there."""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback."""


class TrainingError(Exception):
    """Training itself failed (a NaN loss, a worker that never answered): one line on stderr, exit code 1."""


class Preempted(BaseException):
    """SIGTERM or SIGUSR1 (a scheduler's pre-emption notice) arrived: raised in the main thread, between two
    Python steps of training, like KeyboardInterrupt; one line, exit code 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
