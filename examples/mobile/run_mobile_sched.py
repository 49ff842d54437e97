"""Start the Scheduler in the background, as the guide's ``run_mobile_sched.py``.

    python run_mobile_sched.py --scheduler_ip=127.0.0.1 --scheduler_port=6667 --fl_server_port=6668 \
        --server_num=4 --scheduler_manage_port=11202 --config_file_path=$PWD/config.json

Every FL context key is accepted as a ``--flag`` and passed on to ``test_mobile_lenet.py``, which runs in
``./scheduler/`` (recreated) with ``MS_NODE_ID=20`` and logs to ``scheduler/scheduler.log``.
"""

import argparse
import os
import sys
from pathlib import Path

from flcluster.config import add_context_arguments, context_kwargs_from_args
from flcluster.errors import ConfigError
from flcluster.launch import flags, python_command, refuse_before_launch, start_process

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_context_arguments(parser)
    args, _unknown = parser.parse_known_args()
    kwargs = context_kwargs_from_args(args)
    kwargs["ms_role"] = "MS_SCHED"
    try:
        refuse_before_launch(kwargs, "MS_SCHED")
    except ConfigError as err:
        sys.exit(f"run_mobile_sched.py: {err}")
    env = {**os.environ, "MS_NODE_ID": os.environ.get("MS_SCHED_NODE_ID", "20")}
    argv = [*python_command(HERE / "test_mobile_lenet.py"), *flags(kwargs)]
    _proc, launched = start_process(argv, workdir=Path.cwd() / "scheduler", log_name="scheduler.log", env=env)
    print(f"started the Scheduler, pid {launched.pid}, log {launched.log}")
