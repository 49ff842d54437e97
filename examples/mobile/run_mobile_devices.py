"""Run simulated devices against a cluster started with ``run_mobile_sched.py`` and ``run_mobile_server.py``.

    python run_mobile_devices.py --fl_server_port=6668 --server_num=4 --device_num=20 --mode=train \
        --iterations=10 --use_elb --plot=accuracy.png

Device *i* talks to Server ``i % server_num`` (port ``fl_server_port + i % server_num``), or with
``--use_elb`` to a random Server for every request, as the original client's ``useElb``. ``--mode=train``
trains LeNet-5 on scikit-learn's digits (or ``--data=<MNIST IDX folder | LEAF FEMNIST folder>``) split
non-IID across the devices and prints the global model's test accuracy after each iteration;
``--mode=synthetic`` uploads seeded random weights for load tests. ``--plot`` writes a PNG of the accuracy.
Against a cluster with ``enable_ssl``, ``--ca_cert=ca.pem`` talks HTTPS and checks the Servers' certificates
(``--client_cert`` and ``--client_password`` present a client certificate, for a proxy that asks for one).
"""

import argparse
import logging
import sys
from pathlib import Path

import trio

from flcluster.client import SimulatorConfig, default_servers, plot_accuracy, simulate
from flcluster.errors import ConfigError


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    add("--server_ip", default="127.0.0.1", help="address of the Servers' device ports")
    add("--fl_server_port", type=int, default=6668, help="device port of Server 0")
    add("--server_num", type=int, default=1, help="number of Servers (ports fl_server_port + i)")
    add("--http_url_prefix", default="", help="the cluster's http_url_prefix")
    add("--fl_name", default="Lenet", help="fl_name sent by every device")
    add("--device_num", type=int, default=20, help="number of simulated devices")
    add("--mode", choices=("train", "synthetic"), default="train")
    add("--iterations", type=int, default=10, help="simulator iterations to run")
    add("--data", default="digits", help="'digits', a folder of MNIST IDX files, or a LEAF FEMNIST folder")
    add("--dirichlet_alpha", type=float, default=0.5, help="non-IID concentration (small = skewed)")
    add("--seed", type=int, default=0)
    add("--use_elb", type=_bool, nargs="?", const=True, default=False, help="random Server per request")
    add("--train_concurrency", type=int, default=2, help="devices training at once (worker threads)")
    add("--epochs", type=int, default=None, help="local epochs (default: the server's FLPlan)")
    add("--batch_size", type=int, default=None, help="local batch size (default: the server's FLPlan)")
    add("--lr", type=float, default=None, help="local learning rate (default: the server's FLPlan)")
    add("--data_size", type=int, default=32, help="data size each device declares in synthetic mode")
    add("--plot", default="", help="write a PNG of the accuracy per iteration here (train mode)")
    add("--no_progress", action="store_true", help="no progress bar and no per-iteration lines")
    add("--log_level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add("--ca_cert", default="", help="CA bundle of the Servers' HTTPS certificates (enable_ssl clusters)")
    add("--client_cert", default="", help="client certificate the devices present (PKCS#12 or PEM)")
    add("--client_password", default="", help="opens --client_cert")
    return parser


def main() -> int:
    args = _parser().parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.plot and args.mode != "train":
        sys.exit("--plot needs --mode=train: synthetic updates are not evaluated")
    try:
        config = SimulatorConfig(
            servers=default_servers(
                args.server_ip,
                args.fl_server_port,
                args.server_num,
                scheme="https" if args.ca_cert or args.client_cert else "http",
            ),
            num_devices=args.device_num,
            mode=args.mode,
            iterations=args.iterations,
            data=args.data,
            dirichlet_alpha=args.dirichlet_alpha,
            seed=args.seed,
            use_elb=args.use_elb,
            train_concurrency=args.train_concurrency,
            fl_name=args.fl_name,
            url_prefix=args.http_url_prefix,
            synthetic_data_size=args.data_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            progress=not args.no_progress,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_password=args.client_password,
        )
        report = trio.run(simulate, config)
    except ConfigError as exc:
        sys.exit(f"run_mobile_devices.py: {exc}")
    except KeyboardInterrupt:
        return 130
    last = report.iterations[-1] if report.iterations else None
    print(
        f"done: {len(report.iterations)} iterations in {report.elapsed:.1f} s"
        + ("" if last is None or last.accuracy is None else f", final accuracy {last.accuracy:.4f}")
    )
    if args.plot:
        print(f"accuracy plot: {plot_accuracy(report, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
