"""`signal` umbrella command and the `signal-coordinator` / `signal-worker` entry points."""

from __future__ import annotations

import argparse
import sys


def _not_yet(name: str) -> int:
    print(f"signal {name}: not implemented yet", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signal", description="Signal: federated LoRA training")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list built-in models (builds them on first use)")
    sub.add_parser("coordinator", help="run the coordinator")
    sub.add_parser("worker", help="run a worker")
    sub.add_parser("demo", help="run the end-to-end demo on this machine")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from rewardsignal.models import fingerprint, list_models, resolve_model_path

        for info in list_models():
            path = resolve_model_path(info["model_id"])
            print(f"{info['model_id']:14s} {info['param_count']:>11,d} params  "
                  f"{fingerprint(info['model_id'])[:23]}  {path}")
        return 0
    return _not_yet(args.command)


def coordinator_main() -> int:
    return _not_yet("coordinator")


def worker_main() -> int:
    return _not_yet("worker")


if __name__ == "__main__":
    sys.exit(main())
