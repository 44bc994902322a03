"""Shared test helpers: the CLI called in-process."""

import pytest

from sim.cli import main


def run_cli(args, capsys):
    """``sim <args>`` in this process (the console script's code path without its interpreter start,
    which costs seconds here): -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err
