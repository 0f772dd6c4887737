"""Exception types. A bad config or input exits with code 2, a runtime failure with 1."""


class StreamtuneError(Exception):
    """Base class of streamtune's own errors (runtime failure, exit code 1; the CLI prints ``label: message``)."""

    exit_code = 1
    label = "error"


class InputError(StreamtuneError):
    """A user input (file, path, dataset line, budget) is wrong; the message says how to fix it."""

    exit_code = 2


class ConfigError(InputError):
    """One or more config keys are invalid.

    Attributes:
        problems: every problem found, each ``"key: what is wrong; allowed: ..."``.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")
