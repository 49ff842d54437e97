"""Start Servers in the background, as the guide's ``run_mobile_server.py``.

    python run_mobile_server.py --scheduler_ip=127.0.0.1 --scheduler_port=6667 --fl_server_port=6668 \
        --server_num=4 --start_fl_job_threshold=8 --config_file_path=$PWD/config.json

starts ``--local_server_num`` Servers (default: ``server_num``) on device ports ``fl_server_port + i``,
each running ``test_mobile_lenet.py`` in ``./server_<i>/`` (recreated) and logging to ``server.log``.
Every FL context key is accepted as a ``--flag`` and passed on. Node ids: see ``flcluster.launch``.
"""

import argparse
import sys
from pathlib import Path

from flcluster.config import add_context_arguments, context_kwargs_from_args
from flcluster.errors import ConfigError
from flcluster.launch import python_command, refuse_before_launch, start_servers

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_context_arguments(parser)
    parser.add_argument("--local_server_num", type=int, default=-1)
    args, _unknown = parser.parse_known_args()
    kwargs = context_kwargs_from_args(args)
    server_num = int(str(kwargs.get("server_num", 1)))
    local = server_num if args.local_server_num == -1 else args.local_server_num
    if not 1 <= local <= server_num:
        sys.exit(
            f"The local server number {local} must be between 1 and the total server number {server_num}."
        )
    try:
        refuse_before_launch(kwargs, "MS_SERVER")
    except ConfigError as err:
        sys.exit(f"run_mobile_server.py: {err}")
    for _proc, launched in start_servers(
        python_command(HERE / "test_mobile_lenet.py"), kwargs, local_server_num=local
    ):
        print(f"started a Server, pid {launched.pid}, log {launched.log}")
