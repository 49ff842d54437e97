"""Stop the whole cluster, as the guide's ``finish_mobile.py``.

    python finish_mobile.py --scheduler_port=6667

Asks the Scheduler to finish every node gracefully and prints ``killed <pid>`` for each process that
ended (falling back to signals for any that does not answer).
"""

import argparse
import sys
from functools import partial

import trio

from flcluster.roles import configure_logging
from flcluster.runtime.finish import finish_cluster

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scheduler_ip", type=str, default="127.0.0.1")
    parser.add_argument("--scheduler_port", type=int, default=6667)
    parser.add_argument("--grace", type=float, default=15.0)
    args, _unknown = parser.parse_known_args()
    configure_logging()
    ended = trio.run(partial(finish_cluster, args.scheduler_ip, args.scheduler_port, grace=args.grace))
    sys.exit(0 if ended else 1)
