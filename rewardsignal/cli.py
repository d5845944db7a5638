"""Command line: the `signal` umbrella and the `signal-coordinator` /
`signal-worker` entry points. Flags are --kebab-case; each coordinator knob also
reads its conventional environment variable (MAX_STALENESS, ...)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

from rewardsignal import cli_jobs, cli_runs
from rewardsignal.cli_common import Parser
from rewardsignal.cli_common import die as _die
from rewardsignal.cli_common import env as _env
from rewardsignal.cli_common import non_negative_int as _non_negative_int
from rewardsignal.cli_common import positive as _positive
from rewardsignal.cli_common import table as _table
from rewardsignal.errors import SignalError


def _csv(name: str) -> list[str]:
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _seconds(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be <= 65535, got {text}")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def add_coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=_env("SIGNAL_HOST", default="127.0.0.1"),
                   help="address to bind (non-loopback needs --api-key and --worker-token)")
    p.add_argument("--port", type=_port, default=_env("SIGNAL_PORT", int, 8000),
                   help="port to bind; 0 picks a free one (default 8000)")
    p.add_argument("--data-dir", type=Path, default=_env("SIGNAL_DATA_DIR", Path,
                                                         Path("./signal-data")),
                   help="where runs, checkpoints and exports live (default ./signal-data)")
    p.add_argument("--checkpoint-dir", type=Path, default=_env("CHECKPOINT_DIR", Path),
                   help="checkpoint root (env CHECKPOINT_DIR; default <data-dir>/checkpoints)")
    p.add_argument("--models", type=Path, default=_env("SIGNAL_MODELS_FILE", Path),
                   help="YAML file listing the base models this coordinator serves (env "
                        "SIGNAL_MODELS_FILE; required off loopback; default: any id)")
    p.add_argument("--log-to", default=_env("SIGNAL_LOG_TO", default=""),
                   help="experiment tracking for runs that choose none: tensorboard,wandb "
                        "(comma-separated; needs the matching extra; env SIGNAL_LOG_TO; "
                        "default: none)")
    p.add_argument("--wandb-project", default=_env("WANDB_PROJECT"),
                   help="W&B project of runs logging to wandb (env WANDB_PROJECT; default: "
                        "'signal')")
    p.add_argument("--api-key", action="append", default=None,
                   help="user API key; repeatable (env SIGNAL_API_KEYS, comma-separated)")
    p.add_argument("--worker-token", action="append", default=None,
                   help="worker token; repeatable (env SIGNAL_WORKER_TOKENS, comma-separated)")
    p.add_argument("--max-staleness", type=_non_negative_int,
                   default=_env("MAX_STALENESS", int, 0),
                   help="reject updates computed this many versions ago (env MAX_STALENESS)")
    p.add_argument("--delta-norm-max", type=_positive(float),
                   default=_env("DELTA_NORM_MAX", float, math.inf),
                   help="reject updates whose norm per unit of loss weight exceeds this "
                        "(env DELTA_NORM_MAX; default no limit)")
    p.add_argument("--tick-interval-s", "--tick-interval-sec", dest="tick_interval_s",
                   type=_positive(float), default=_env("TICK_INTERVAL_SEC", float, 1.0),
                   help="how often leases are checked for expiry, in seconds (env "
                        "TICK_INTERVAL_SEC)")
    p.add_argument("--num-tasks-per-round", "--tasks-per-round", dest="num_tasks_per_round",
                   type=_positive(int),
                   default=_env("NUM_TASKS_PER_ROUND", int, 4),
                   help="federated jobs: train tasks per round (env NUM_TASKS_PER_ROUND)")
    p.add_argument("--min-updates-per-round", type=_positive(int),
                   default=_env("MIN_UPDATES_PER_ROUND", int, 1),
                   help="federated jobs: accepted updates needed to close a round at its "
                        "timeout (env MIN_UPDATES_PER_ROUND)")
    p.add_argument("--round-timeout-s", "--round-timeout-sec", dest="round_timeout_s",
                   type=_positive(float), default=_env("ROUND_TIMEOUT_SEC", float, 600.0),
                   help="federated jobs: seconds before a round closes with what it has "
                        "(env ROUND_TIMEOUT_SEC)")
    p.add_argument("--lease-timeout-s", type=_positive(float),
                   default=_env("SIGNAL_LEASE_TIMEOUT_S", float, 30.0),
                   help="a worker silent this long loses its task (default 30)")
    p.add_argument("--max-task-attempts", type=_positive(int), default=3,
                   help="leases a task may lose before its request fails (default 3)")
    p.add_argument("--max-body-mb", type=_positive(int), default=512,
                   help="largest request body accepted, in MiB (default 512)")
    p.add_argument("--upload-slots", type=_positive(int),
                   default=_env("SIGNAL_UPLOAD_SLOTS", int, 2),
                   help="worker updates received and checked at once; memory is about "
                        "5x the update size per slot (env SIGNAL_UPLOAD_SLOTS, default 2)")
    p.add_argument("--keep-last", type=_positive(int), default=5,
                   help="unnamed checkpoints kept per run (default 5)")
    p.add_argument("--checkpoint-interval-s", type=_seconds, default=1.0,
                   help="a run's optim_step checkpoints are written in the background at "
                        "most this often; steps in between are replayed after a crash "
                        "(0: every version; default 1)")
    p.add_argument("--no-worker-grace-s", type=_positive(float),
                   default=_env("SIGNAL_NO_WORKER_GRACE_S", float, 60.0),
                   help="a request that no live worker can take fails after this many seconds "
                        "(env SIGNAL_NO_WORKER_GRACE_S, default 60)")
    p.add_argument("--worker-retention-s", type=_positive(float),
                   default=_env("SIGNAL_WORKER_RETENTION_S", float, 600.0),
                   help="workers gone this long leave the worker list, dashboard and metrics "
                        "(env SIGNAL_WORKER_RETENTION_S, default 600)")
    p.add_argument("--verify-fraction", type=_fraction,
                   default=_env("SIGNAL_VERIFY_FRACTION", float, 0.05),
                   help="share of a trusted worker's forward_backward/forward results that a "
                        "second worker recomputes and must agree with before they count; 0 "
                        "turns verification off, probation included, for a trusted fleet (env "
                        "SIGNAL_VERIFY_FRACTION, default 0.05)")
    p.add_argument("--probation-tasks", type=_non_negative_int,
                   default=_env("SIGNAL_PROBATION_TASKS", int, 5),
                   help="a new worker's results are all recomputed until this many agreed in a "
                        "row; a disagreement starts it over (env SIGNAL_PROBATION_TASKS, "
                        "default 5)")
    p.add_argument("--verify-train-fraction", type=_fraction,
                   default=_env("SIGNAL_VERIFY_TRAIN_FRACTION", float, 0.05),
                   help="share of a trusted worker's federated train deltas that a second "
                        "worker recomputes (same shard, seed and local steps) before they "
                        "count; a worker on probation has all of them checked; 0 checks none "
                        "(env SIGNAL_VERIFY_TRAIN_FRACTION, default 0.05)")
    p.add_argument("--verify-memory-mb", type=_non_negative_int,
                   default=_env("SIGNAL_VERIFY_MEMORY_MB", int, 1024),
                   help="memory for gradients waiting for their checks: a worker on probation "
                        "computes checks of others' results instead of new work while this is "
                        "full (0: one at a time; env SIGNAL_VERIFY_MEMORY_MB, default 1024)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


def coordinator_config(args: argparse.Namespace):
    from rewardsignal.coordinator.catalog import load_catalog
    from rewardsignal.coordinator.config import CoordinatorConfig
    from rewardsignal.coordinator.tracking import check_backends

    log_to = tuple(x.strip() for x in args.log_to.split(",") if x.strip())
    check_backends(log_to, args.wandb_project if log_to else None)
    return CoordinatorConfig(
        models=load_catalog(args.models) if args.models is not None else None,
        log_to=log_to, wandb_project=args.wandb_project,
        data_dir=args.data_dir, checkpoint_dir=args.checkpoint_dir, host=args.host,
        port=args.port, api_keys=tuple(args.api_key or _csv("SIGNAL_API_KEYS")),
        worker_tokens=tuple(args.worker_token or _csv("SIGNAL_WORKER_TOKENS")),
        max_staleness=args.max_staleness, delta_norm_max=args.delta_norm_max,
        tick_interval_s=args.tick_interval_s, lease_timeout_s=args.lease_timeout_s,
        max_task_attempts=args.max_task_attempts, max_body_bytes=args.max_body_mb << 20,
        upload_slots=args.upload_slots,
        keep_last_checkpoints=args.keep_last, checkpoint_interval_s=args.checkpoint_interval_s,
        num_tasks_per_round=args.num_tasks_per_round,
        min_updates_per_round=args.min_updates_per_round,
        round_timeout_s=args.round_timeout_s, no_worker_grace_s=args.no_worker_grace_s,
        worker_retention_s=args.worker_retention_s, verify_fraction=args.verify_fraction,
        probation_tasks=args.probation_tasks, verify_train_fraction=args.verify_train_fraction,
        verify_memory_mb=args.verify_memory_mb)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", "--url", dest="coordinator",
                   default=_env("SIGNAL_URL") or _env("SIGNAL_COORDINATOR"),
                   help="coordinator URL, e.g. http://127.0.0.1:8000 (env SIGNAL_URL; "
                        "SIGNAL_COORDINATOR also read)")
    p.add_argument("--token", default=_env("SIGNAL_WORKER_TOKEN"),
                   help="worker token (env SIGNAL_WORKER_TOKEN)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--name", default="", help="name shown in the coordinator's worker list")
    p.add_argument("--max-tokens-per-task", type=_positive(int), default=None,
                   help="largest shard to accept (default: derived from free device memory)")
    p.add_argument("--micro-batch-tokens", type=_positive(int), default=None,
                   help="padded tokens per forward pass inside a task (halved on OOM)")
    p.add_argument("--model-cache-gb", type=_positive(float), default=None,
                   help="memory for cached base models; the least recently used is unloaded "
                        "to make room (default: 60%% of GPU memory, 50%% of RAM on CPU, of "
                        "--memory-gb when given; at most --memory-gb)")
    p.add_argument("--memory-gb", type=_positive(float), default=_env("SIGNAL_MEMORY_GB", float),
                   help="memory this worker offers: the coordinator sends it only runs whose "
                        "estimated need fits (env SIGNAL_MEMORY_GB; default: the GPU's memory, "
                        "or RAM on CPU)")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads for torch (default: torch's choice; lower it when "
                        "several workers share one machine)")
    p.add_argument("--codec", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                   help="encoding of submitted gradients (default fp32, exact)")
    p.add_argument("--max-tasks", type=_positive(int), default=None,
                   help="exit after this many tasks")
    p.add_argument("--gpus", default=None,
                   help="all | 0,1,...: one worker process per GPU under one supervisor (each "
                        "registers on its own; --memory-gb and the other flags apply to each)")
    p.add_argument("--gpus-per-worker", type=_positive(int), default=1,
                   help="with --gpus: one worker process per group of this many GPUs, each "
                        "base model spread over the group (accelerate device_map) and the "
                        "group's memory summed: for models larger than one GPU (default 1)")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="auto: spread each base model over every GPU this worker sees "
                        "(CUDA_VISIBLE_DEVICES) with accelerate's device_map, offering their "
                        "summed memory; needs --device cuda (--gpus-per-worker sets it)")
    p.add_argument("--sampler", default="builtin", choices=["builtin", "vllm"],
                   help="what runs sample tasks: the built-in batched generation, or vLLM "
                        "on a CUDA worker (pip install 'rewardsignal[vllm]'; temperatures 0 "
                        "and 1 of unquantized bases, others stay built-in)")
    p.add_argument("--vllm-memory", type=_fraction, default=0.3,
                   help="with --sampler vllm: the share of the GPU its engine takes (weights "
                        "and KV cache), beside the training engine (default 0.3)")
    p.add_argument("--no-channel", action="store_true",
                   help="lease and send results as plain HTTP requests, not on the "
                        "coordinator's worker channel (a WebSocket): for a proxy that does not "
                        "pass WebSockets (the worker also falls back by itself)")
    # Tests of the supervisor on machines without GPUs: --gpus 0,1 starts CPU children.
    p.add_argument("--cpu-standins", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


def worker_config(args: argparse.Namespace):
    from rewardsignal.worker.loop import WorkerConfig

    if not args.coordinator:
        raise _die("--coordinator URL is required (or set SIGNAL_URL), "
                         "e.g. signal-worker --coordinator http://127.0.0.1:8000")
    if not args.coordinator.startswith(("http://", "https://")):
        raise _die(f"--coordinator must be an http(s) URL, got {args.coordinator!r}")
    if args.model_cache_gb and args.memory_gb and args.model_cache_gb > args.memory_gb:
        raise _die(f"--model-cache-gb {args.model_cache_gb:g} exceeds --memory-gb "
                   f"{args.memory_gb:g}: the cache is part of the memory the worker offers")
    return WorkerConfig(coordinator=args.coordinator, token=args.token, device=args.device,
                        name=args.name, max_tokens_per_task=args.max_tokens_per_task,
                        micro_batch_tokens=args.micro_batch_tokens, codec=args.codec,
                        threads=args.threads, model_cache_gb=args.model_cache_gb,
                        memory_gb=args.memory_gb, max_tasks=args.max_tasks,
                        device_map=args.device_map, sampler=args.sampler,
                        vllm_memory=args.vllm_memory, channel=not args.no_channel)


def _run_coordinator(args: argparse.Namespace) -> int:
    from rewardsignal.coordinator.server import run

    _setup_logging(args.log_level)
    return run(coordinator_config(args))


def _run_worker(args: argparse.Namespace) -> int:
    from rewardsignal.openmp import short_spin
    from rewardsignal.worker.allocator import keep_freed_memory

    keep_freed_memory()  # before torch starts any thread
    short_spin()  # before torch loads libgomp
    from rewardsignal.worker.loop import run_worker

    _setup_logging(args.log_level)
    config = worker_config(args)
    if args.gpus is not None:
        return _run_box(args, config)
    if args.gpus_per_worker != 1:
        raise _die("--gpus-per-worker groups the GPUs of --gpus: add --gpus all (or a list)")
    return run_worker(config)


def _run_box(args: argparse.Namespace, config) -> int:
    """``--gpus``: a supervisor and one worker process per GPU."""
    import socket

    from rewardsignal.errors import ValidationError
    from rewardsignal.worker.supervisor import Supervisor, children_for, group_gpus, parse_gpus

    if args.device != "auto":
        raise _die("--gpus picks each worker's device: leave out --device")
    if args.cpu_standins:
        available = len(args.gpus.split(","))
    else:
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device_map is not None:
        raise _die("--gpus sets each worker's device map: use --gpus-per-worker N to spread "
                   "models over groups of N GPUs")
    try:
        gpus = parse_gpus(args.gpus, available)
        group_gpus(gpus, args.gpus_per_worker)
    except ValidationError as exc:
        raise _die(exc.message) from None
    flags = ["--coordinator", config.coordinator, "--codec", config.codec,
             "--log-level", args.log_level, "--sampler", config.sampler,
             "--vllm-memory", str(config.vllm_memory)] + ([] if config.channel else ["--no-channel"])
    for flag, value in (("--max-tokens-per-task", config.max_tokens_per_task),
                        ("--micro-batch-tokens", config.micro_batch_tokens),
                        ("--threads", config.threads), ("--model-cache-gb", config.model_cache_gb),
                        ("--memory-gb", config.memory_gb), ("--max-tasks", config.max_tasks)):
        if value is not None:
            flags += [flag, str(value)]
    if config.token:  # through the environment: not visible in the process list
        os.environ["SIGNAL_WORKER_TOKEN"] = config.token
    children = children_for(gpus, flags, config.name or socket.gethostname(),
                            cpu_standins=args.cpu_standins, per_worker=args.gpus_per_worker)
    return Supervisor(children).run()


def _run_models(args: argparse.Namespace) -> int:
    from rewardsignal.models import fingerprint, list_models, resolve_model_path

    for info in list_models():
        path = resolve_model_path(info["model_id"])
        print(f"{info['model_id']:14s} {info['param_count']:>11,d} params  "
              f"{fingerprint(info['model_id'])[:23]}  {path}")
    return 0


def _run_keys(args: argparse.Namespace) -> int:
    import secrets
    import time

    from rewardsignal.coordinator.store.keys import create_key, key_hash, list_keys, revoke_key

    db = Path(args.data_dir) / "signal.db"
    if args.keys_command == "create":
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", args.name):
            raise _die("--name must be 1-64 letters, digits, '_', '.', '@', '-'")
        if not re.fullmatch(r"[a-z]{1,16}", args.prefix or "x"):
            raise _die("--prefix must be 1-16 lowercase letters (e.g. tml for the Tinker SDK)")
        prefix = args.prefix or ("wt" if args.worker else "sk")
        key = f"{prefix}-" + secrets.token_urlsafe(32)
        try:
            create_key(db, args.name, "worker" if args.worker else "user", key_hash(key))
        except ValueError as exc:
            raise _die(str(exc)) from None
        print(key)
        print(f"{'worker token' if args.worker else 'API key'} {args.name!r} created; it is "
              "shown only this once (only its hash is stored)", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        keys = list_keys(db) if db.exists() else []
        print(_table(["NAME", "SCOPE", "CREATED", "STATUS"],
                     [[k["name"], k["scope"], time.strftime("%Y-%m-%d %H:%M",
                                                            time.localtime(k["created"])),
                       "revoked" if k["revoked"] else "active"] for k in keys]))
        return 0
    if not db.exists() or not revoke_key(db, args.name):
        raise _die(f"no active key named {args.name!r} in {db}")
    print(f"revoked {args.name!r}; a running coordinator refuses it from its next request")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from rewardsignal.demo import run_demo

    return run_demo(steps=args.steps, workers=args.workers, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="signal", description="Signal: federated LoRA training on volunteer GPUs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    c = sub.add_parser("coordinator", help="run the coordinator")
    add_coordinator_args(c)
    c.set_defaults(func=_run_coordinator)
    w = sub.add_parser("worker", help="run a worker")
    add_worker_args(w)
    w.set_defaults(func=_run_worker)
    m = sub.add_parser("models", help="list built-in models (builds them on first use)")
    m.set_defaults(func=_run_models)
    k = sub.add_parser("keys", help="create, list and revoke API keys and worker tokens")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    for name, text in (("create", "make a new key (printed once)"), ("list", "list keys"),
                       ("revoke", "revoke a key by name")):
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("--data-dir", type=Path, default=_env("SIGNAL_DATA_DIR", Path,
                                                              Path("./signal-data")),
                        help="the coordinator's data directory (default ./signal-data)")
        if name == "create":
            kp.add_argument("--name", required=True, help="the key's name")
        elif name == "revoke":
            kp.add_argument("name", help="the key's name")
        if name == "create":
            kp.add_argument("--worker", action="store_true",
                            help="make a worker token instead of a user API key")
            kp.add_argument("--prefix", default=None,
                            help="the key's prefix (default sk, or wt with --worker); 'tml' "
                            "makes a key the Tinker SDK accepts (docs/tinker.md)")
    k.set_defaults(func=_run_keys)
    cli_jobs.add_parsers(sub)
    cli_runs.add_parsers(sub)
    d = sub.add_parser("demo", help="coordinator + 2 workers on this machine: train, sample, save")
    d.add_argument("--steps", type=_positive(int), default=100,
                   help="optim steps (default 100)")
    d.add_argument("--workers", type=_positive(int), default=2, help="worker processes")
    d.add_argument("--out", type=Path, default=Path("./signal-demo"),
                   help="where the demo keeps its data and the saved adapter")
    d.set_defaults(func=_run_demo)
    return p


def _dispatch(args: argparse.Namespace) -> int:
    import aiohttp

    try:
        return args.func(args)
    except SignalError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (aiohttp.ClientConnectionError, ConnectionError) as exc:
        url = getattr(args, "coordinator", None)
        print(f"error: cannot reach the coordinator at {url} ({exc}); is it running? "
              "Check --coordinator / SIGNAL_URL.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return _dispatch(build_parser().parse_args(argv))


def coordinator_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="signal-coordinator", description="run the coordinator")
    add_coordinator_args(p)
    p.set_defaults(func=_run_coordinator)
    return _dispatch(p.parse_args(argv))


def worker_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="signal-worker", description="run a worker")
    add_worker_args(p)
    p.set_defaults(func=_run_worker)
    return _dispatch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
