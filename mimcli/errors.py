"""Errors the CLI turns into one clear line: exit 2 for user mistakes, 1 for remote failures."""


class MimcliError(Exception):
    """A mistake in what the user asked for: bad path, unknown model, unsupported file.

    The message names the problem and what to do about it; the CLI prints it as one line and
    exits with code 2.
    """

    exit_code = 2


class RemoteError(MimcliError):
    """A remote service (the Hub, a download URL) failed after retries; the CLI exits with 1."""

    exit_code = 1


class Interrupted(MimcliError):
    """The run was stopped by a signal (Ctrl-C, SIGTERM); the message says what was saved and
    how to go on. The CLI exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
