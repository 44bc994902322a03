"""The `sim` console script. Ctrl-C and SIGTERM are held while the command line imports (sim._interrupts:
raised inside an import's callbacks they are lost, or end the interpreter by SIGINT with nothing
said) and take effect when sim.cli.main starts: one line, exit 130 / 143, never a traceback. Once the
command has ended, they are ignored while the interpreter exits. A ``sim sweep`` / ``sim run`` with
local workers starts their fork server first (sim._fork_server), its imports beside the command's."""

import os
import signal
import sys


def main() -> None:
    from sim import _interrupts

    _interrupts.hold()  # Ctrl-C from here on is acted on where it can be cleaned up (sim._interrupts)
    from sim import _fork_server

    if _fork_server.wanted_by(sys.argv[1:]):  # its imports beside ours (sim._fork_server)
        _fork_server.start_fork_server()
    try:
        from sim.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        # os._exit, not sys.exit: a KeyboardInterrupt that passed through an extension's
        # PyRun_* call while importing marks itself unhandled, and the interpreter would then end
        # by SIGINT (exit -2) even though it was caught here
        os._exit(130)
    try:
        cli_main()
    finally:
        # the command has ended (its line or its output given, its exit code set): a signal during
        # the interpreter's exit (the workers' pool, the fork server and numba's threads stopping)
        # would end it by SIGINT / SIGTERM with nothing said, or as "Exception ignored" lines
        for sig in _interrupts.HELD:
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
