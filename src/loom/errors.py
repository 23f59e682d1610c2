"""User-facing errors.

A :class:`LoomError` is a mistake the user can fix (bad config, missing corpus, tampered
checkpoint). The CLI prints it as one paragraph, problem then fix, with no traceback.
Programming errors stay ordinary exceptions so their traceback is kept.
"""


class LoomError(Exception):
    """A problem the user can fix. ``problem`` says what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem, fix)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}\nFix: {self.fix}"
