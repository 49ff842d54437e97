"""The training script every role runs, as the guide's ``test_mobile_lenet.py``.

It parses the guide's flags (every FL context key is accepted), hands them to
``flcluster.set_fl_context``, and runs the role they name (``--ms_role=MS_SCHED`` or ``MS_SERVER``).
A Server starts from this script's LeNet5; the Scheduler needs no model (and never loads torch).
"""

import argparse
import sys

import flcluster
from flcluster.config import add_context_arguments, context_kwargs_from_args
from flcluster.roles import resolve_context

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_context_arguments(parser)
    args, _unknown = parser.parse_known_args()
    flcluster.set_fl_context(**context_kwargs_from_args(args))
    model = None
    if resolve_context().ms_role == "MS_SERVER":
        from src.model import LeNet5

        model = LeNet5()
    sys.exit(flcluster.run_role(model=model))
