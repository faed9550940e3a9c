"""User-facing training errors: one line, naming what is wrong and what to do."""


class TrainingError(Exception):
    """A run cannot start or continue because of the user's model, data or checkpoint."""


# Exit codes of a rank after a signal-triggered checkpoint (or a hang); relaunching resumes.
EXIT_REQUEUE = 75  # SIGUSR2 (time limit / preemption notice) or a hang: the job should requeue
EXIT_STOPPED = 76  # SIGTERM/SIGUSR1/Ctrl-C only: stopped (e.g. cancelled)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type's name: how a
    one-line error or warning quotes an exception from a library."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require(ok: bool, message: str) -> None:
    """A config section's check (in `__post_init__`): ValueError("field: message") unless
    `ok`; the loader adds the section's dotted path and the file."""
    if not ok:
        raise ValueError(message)
