"""The ways a run ends early, shared by every module: how `common.main` reports each is fixed there."""
import contextlib
import signal
import sys

# What a scheduler sends before it stops a job: SIGTERM (SLURM's pre-emption, requeue and time limit;
# Kubernetes), SIGUSR1 and SIGUSR2 (SLURM's --signal warnings; submitit asks for USR2, and SLURM delivers it to
# every process of the job step, the training script included). The run stops where it is, keeps its last
# completed epoch (saved atomically after each epoch) and exits with 128 + the signal's number (143, 138, 140);
# the same command with --resume continues exactly as after kill -9.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback."""


class TrainingError(Exception):
    """Training itself failed (a NaN loss, a worker that never answered): one line on stderr, exit code 1."""


class Preempted(BaseException):
    """One of STOP_SIGNALS (a scheduler's pre-emption notice) arrived: raised in the main thread, between two
    Python steps of training, like KeyboardInterrupt; one line, exit code 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def one_line_usage_errors(prog):
    """Every entry point's rule for bad input: within, a UsageError ends the program with one line on stderr,
    `<prog>: error: <what is wrong and the fix>`, and exit code 2, never a traceback."""
    try:
        yield
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
