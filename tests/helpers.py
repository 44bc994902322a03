"""Shared test helpers: the CLI called in-process."""

import sys

import pytest

from sim.cli import main


def run_cli(args, capsys):
    """``sim <args>`` in this process (the console script's code path without its interpreter start,
    which costs seconds here): -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# Two CPU processes (gloo) under each launcher users run. --standalone / port 0: the rendezvous takes
# a free port (a fixed one can be taken on a shared machine). accelerate on CPU: its --cpu launcher
# runs several processes only through MPI, so --multi_gpu (its torch.distributed launcher), which
# trains on the CPU with gloo where there is no GPU.
TWO_PROCESS_LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
                   "--dynamo_backend", "no"],
}
