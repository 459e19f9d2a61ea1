"""argparse with one-line errors: a usage mistake prints a single line and exits 2 (see main.run_guarded)."""
from __future__ import annotations

import argparse


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage block first
        raise UsageError(message)


class RunFailed(Exception):
    """A run-time failure that is not a usage error (exit 1, one line): NaN output, ranks that diverged."""
