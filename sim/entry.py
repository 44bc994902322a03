"""The `sim` console script: imports the command line inside a guard, so that Ctrl-C while torch
and pandas load (a second or more) prints one line and exits 130 instead of a traceback."""

import os
import sys


def main() -> None:
    try:
        from sim.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        # os._exit, not sys.exit: a KeyboardInterrupt that passed through an extension's
        # PyRun_* call while importing marks itself unhandled, and the interpreter would then end
        # by SIGINT (exit -2) even though it was caught here
        os._exit(130)
    cli_main()


if __name__ == "__main__":
    main()
