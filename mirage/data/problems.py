"""Every problem of a dataset in one error, so that a user fixes them all in one round.

A dataset check that stopped at the first problem would make the user run it once per
broken file. The checks of mirage/data collect one line per problem instead and raise
them together as :class:`DatasetProblems`, a :class:`~mirage.errors.UserError`: the
scripts print it after ``error:`` and exit with status 2, as any other.
"""
from mirage.errors import UserError

# A dataset exported with the wrong class values can have a problem in every mask: the
# first lines say what is wrong; thousands more would only bury them.
MAX_LISTED = 20


class DatasetProblems(UserError):
    """The problems (one line each, in the order found) of ``where`` (a dataset, a split
    folder, a class table). One problem reads as its own line, as any UserError; several
    read as a count naming ``where``, then one indented line each, the first
    :data:`MAX_LISTED` of them and how many more there are."""

    def __init__(self, problems, where):
        self.problems = list(problems)
        self.where = where
        super().__init__(format_problems(self.problems, where))


def format_problems(problems, where):
    """The text of :class:`DatasetProblems`."""
    if len(problems) == 1:
        return problems[0]
    lines = [f"{len(problems)} problems in {where}; fix them all, then run again:"]
    lines += [f"  - {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def problems_of(error):
    """The problem lines of a UserError: its list if it is a DatasetProblems, else its
    one message."""
    return list(error.problems) if isinstance(error, DatasetProblems) else [str(error)]
