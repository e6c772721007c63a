"""Errors raised at the project's boundaries (files, CLI arguments, HTTP requests).

Every message names where the problem is: the file, the line and the field when there is one, so a
user can fix the input without reading a traceback.
"""

from __future__ import annotations


class PrefsteerError(Exception):
    """Base class of the errors prefsteer reports to its users (exit code 2 in the CLI)."""


class InputError(PrefsteerError, ValueError):
    """Bad input data: names the file, the 1-based line and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = []
        if file is not None:
            where.append(f"{file}" + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class UnknownUserError(PrefsteerError, KeyError):
    def __init__(self, user_id: str, known: list[str] | None = None):
        hint = f" (known users: {', '.join(known[:10])}{'...' if len(known) > 10 else ''})" if known else ""
        super().__init__(f"unknown user '{user_id}'{hint}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class MemoryFileError(PrefsteerError):
    """The memory database cannot be used: names the path, what is wrong and what to do."""

    def __init__(self, path: str, problem: str, todo: str):
        self.path, self.problem, self.todo = path, problem, todo
        super().__init__(f"memory {path} {problem}; {todo}")


class MemoryNotFoundError(MemoryFileError, FileNotFoundError):
    """A query opened a memory (`Memory(path, create=False)`) that does not exist; nothing was created."""

    def __init__(self, path: str, todo: str):
        MemoryFileError.__init__(self, path, "does not exist", todo)


class BackendUnavailableError(PrefsteerError, ValueError):
    """A backend name that is unknown, or whose engine is not installed here."""


class EmbedderUnavailableError(PrefsteerError, ValueError):
    """An embedder that cannot be loaded here (no such folder, not cached and the hub unreachable...)."""


def unknown_keys(what: str, given, known) -> None:
    """Raise `InputError` naming the keys of ``given`` that are not in ``known``."""
    bad = sorted(set(given) - set(known))
    if bad:
        raise InputError(f"unknown option{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} for {what}; "
                         f"expected some of {', '.join(sorted(known)) or '(none)'}", field=bad[0])
