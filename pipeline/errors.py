"""Errors a user can act on.

Every expected failure (bad input folder, unknown backbone, missing weights, a cache that does not match) raises a
subclass of :class:`HeadbenchError` whose message is one actionable line. The command-line face prints that line to
stderr and exits with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Sequence


class HeadbenchError(Exception):
    """Base class for failures caused by the user's input or environment, not by a bug."""


class DatasetError(HeadbenchError):
    """The image folder cannot be used as a labelled dataset."""


class BackboneError(HeadbenchError):
    """Unknown backbone or an invalid option for it."""


class WeightsError(HeadbenchError):
    """Backbone weights cannot be found, downloaded or loaded."""


class CacheError(HeadbenchError):
    """A feature cache is missing, unreadable, incomplete or does not match what was asked for."""


class ImageDecodeError(HeadbenchError):
    """One image cannot be decoded (recorded per image, fatal only with ``--strict``)."""


class FitError(HeadbenchError):
    """The fit stage cannot run on what it was given."""


class EngineError(HeadbenchError):
    """An extraction engine cannot run (Ray missing, a bad cluster address, a cluster that cannot do the job)."""


class RunError(HeadbenchError):
    """A run folder (results of ``fit``) is missing or unreadable."""


EXIT_OK = 0
"""Exit status: everything asked for was done."""
EXIT_ERROR = 1
"""Exit status: an expected failure (one line on stderr)."""
EXIT_USAGE = 2
"""Exit status: the command line itself is wrong (unknown option or choice; printed by typer)."""
EXIT_PARTIAL = 3
"""Exit status: done, but some images could not be read or decoded (``extract`` and ``predict``)."""
EXIT_INTERRUPTED = 130
"""Exit status: stopped by Ctrl-C or SIGTERM; finished work is kept and the same command resumes."""


def check_choice(what: str, value: object, choices: Sequence[str], error: type[HeadbenchError]) -> None:
    """Refuse a value outside its choices with the one line every option uses: ``unknown <what> <value>; choose one
    of <choices>`` (``what`` names the option as its caller knows it: ``--pick``, ``resize rule``)."""
    if value not in choices:
        raise error(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
