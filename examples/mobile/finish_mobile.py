"""Stop the whole cluster, as the guide's ``finish_mobile.py``.

    python finish_mobile.py --scheduler_port=6667

Asks the Scheduler to finish every node gracefully and prints ``killed <pid>`` for each process that
ended (falling back to signals for any that does not answer). For a cluster with a management token or
TLS, add ``--config_file_path=$PWD/config.json`` (and ``--enable_ssl=True --client_password=...``); the
token may come from ``FLCLUSTER_MANAGE_TOKEN`` instead.
"""

import argparse
import sys

from flcluster.errors import FLClusterError
from flcluster.operator import add_access_arguments, finish_from_args
from flcluster.roles import configure_logging

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scheduler_ip", type=str, default="127.0.0.1")
    parser.add_argument("--scheduler_port", type=int, default=6667)
    parser.add_argument("--grace", type=float, default=15.0)
    add_access_arguments(parser, finish=True)
    args, _unknown = parser.parse_known_args()
    configure_logging()
    try:
        ended = finish_from_args(args)
    except FLClusterError as exc:
        sys.exit(f"finish_mobile.py: {exc}")
    sys.exit(0 if ended else 1)
