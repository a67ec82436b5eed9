"""Which Python smolcluster runs on, and what a user on an older one is told.

Kept to syntax that old interpreters still parse, so the message (not a SyntaxError) is what they see.
"""

import sys

MIN_PYTHON = (3, 10)
HOW_TO_UPGRADE = ("get a newer one with uv (`uv python install 3.12`, then `uv venv --python 3.12`) or Homebrew "
                  "(`brew install python@3.12`), and install smolcluster with that Python")


def python_problem(version_info=None, executable=None):
    """None when this Python is new enough, else the message to show (names the version and the way out)."""
    v = tuple(version_info if version_info is not None else sys.version_info)
    if v[:2] >= MIN_PYTHON:
        return None
    return "smolcluster needs Python %d.%d or newer; %s is Python %s: %s" % (
        MIN_PYTHON[0], MIN_PYTHON[1], executable or sys.executable, ".".join(str(x) for x in v[:3]), HOW_TO_UPGRADE)
