"""`signal status` (what the dashboard shows, as tables) and `signal train` (a
federated job over a JSONL dataset, followed to its end)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rewardsignal import cli_runs
from rewardsignal.cli_common import add_client_args, die, non_negative_int, positive, table


def _run_status(args: argparse.Namespace) -> int:
    import time

    from rewardsignal import SignalClient

    # A snapshot: a short retry window, so a wrong URL fails in seconds.
    with SignalClient(api_key=args.api_key, base_url=args.coordinator,
                      retry_window_s=5) as client:
        st = client.status()
    now = time.time()
    print(f"coordinator {args.coordinator}: {len(st['runs'])} runs, "
          f"{sum(w['status'] != 'gone' for w in st['workers'])} workers, tasks "
          f"{st['tasks']['pending']} pending / {st['tasks']['leased']} leased\n")
    print(table(["RUN", "BASE MODEL", "PRECISION", "VERSION", "LOSS", "LORA R", "PENDING FB",
                  "WORKERS ABLE"],
                 [[r["run_id"], r["base_model"],
                   r.get("base_dtype", "auto") + (f"+{r['quantization']}"
                                                  if r.get("quantization") else ""),
                   r["version"], f"{r['last_loss']:.4f}" if r["last_loss"] is not None else None,
                   r["lora_r"], r["pending_forward_backward"], r.get("eligible_workers")]
                  for r in st["runs"]]))
    print()
    print(table(["WORKER", "DEVICE", "STATUS", "MEMORY", "TOKENS/S", "TASKS", "REJECTED",
                  "LAST SEEN", "SERVES"],
                 [[w["name"], w["hardware"].get("gpu_name") or w["device"], w["status"],
                   f"{w['memory_bytes'] / 2**30:.1f} GiB" if w.get("memory_bytes") else None,
                   f"{w['tokens_per_s']:,.0f}" if w["tokens_per_s"] else None,
                   w["tasks_completed"], w["rejections"], f"{now - w['last_seen']:.0f}s ago",
                   _serves(w, len(st["runs"]))]
                  for w in st["workers"]]))
    if st["jobs"]:
        print()
        print(table(["JOB", "RUN", "STATUS", "ROUND", "TRAIN LOSS", "EVAL LOSS", "ACCEPTED",
                      "REJECTED"],
                     [[j["job_id"], j["run_id"], j["status"], f"{j['round']}/{j['rounds']}",
                       _latest(j.get("train_loss")), _latest(j.get("eval_loss")),
                       j["accepted"], sum((j.get("rejected") or {}).values())]
                      for j in st["jobs"]]))
    refused = {(w["name"], run_id): why for w in st["workers"] if w["status"] != "gone"
               for run_id, why in (w.get("cannot_serve") or {}).items()}
    if refused:
        print("\nwhy a worker cannot serve a run:")
        for (name, run_id), why in sorted(refused.items()):
            print(f"  {name} x {run_id}: {why}")
    if st["rejections"]:
        print("\nrejected updates by reason:")
        for reason, count in sorted(st["rejections"].items()):
            print(f"  {reason}: {count}")
    return 0


def _latest(history) -> str | None:
    """The last number of a per-round loss list, for a table cell."""
    values = [x for x in (history or []) if x is not None]
    return f"{values[-1]:.4f}" if values else None


def _serves(worker: dict, n_runs: int) -> str:
    """Which of the caller's runs a worker can serve, in a table cell."""
    able = worker.get("can_serve") or []
    if n_runs and len(able) == n_runs:
        return "all runs"
    return ", ".join(able) if able else "none"


def _check_datasets(args: argparse.Namespace) -> None:
    """Every line of the datasets parses, before anything is created (a failed
    attempt must not leave an empty run behind); shapes are checked by the
    coordinator against the run's tokenizer, and a run made for a job it then
    refuses is deleted again."""
    from rewardsignal.data.datasets import iter_jsonl

    for flag, path in (("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise die(f"{flag} {path}: no such file")
        if not any(True for _ in iter_jsonl(path)):
            raise die(f"{flag} {path}: no examples")


def _run_train(args: argparse.Namespace) -> int:
    from rewardsignal import SignalClient
    from rewardsignal.errors import ValidationError

    _check_datasets(args)
    with SignalClient(api_key=args.api_key, base_url=args.coordinator) as client:
        created = args.run_id is None
        if created:
            run = client.create_run(base_model=args.base_model, lora_r=args.lora_r,
                                    learning_rate=args.inner_learning_rate, seed=args.seed)
        else:
            run = client.run(args.run_id)
        try:
            job = run.train_federated(
                args.dataset, eval_dataset=args.eval_dataset, rounds=args.rounds,
                local_steps=args.local_steps, batch_size=args.batch_size,
                inner_learning_rate=args.inner_learning_rate,
                outer_optimizer=args.outer_optimizer,
                outer_learning_rate=args.outer_learning_rate, aggregator=args.aggregator,
                trim_fraction=args.trim_fraction, tasks_per_round=args.tasks_per_round,
                min_updates_per_round=args.min_updates_per_round,
                round_timeout_s=args.round_timeout_s, max_staleness=args.max_staleness,
                delta_norm_max=args.delta_norm_max, codec=args.codec, seed=args.seed)
        except ValidationError:
            if created:
                run.delete()  # the job was refused: leave no empty run behind
            raise
        if created:
            print(f"created run {run.run_id} on {args.base_model}", flush=True)
        print(f"job {job.job_id} started; following it (Ctrl-C stops following, not the job)",
              flush=True)
        st = job.wait()
    evals = [e for e in st["eval_loss_history"] if e is not None]
    print(f"job {st['job_id']}: {st['status']} after {st['round']}/{st['rounds']} rounds, run "
          f"{st['run_id']} at version {st['version']}; accepted {st['accepted']}, rejected "
          f"{st['rejected'] or 'none'}" + (f"; eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
                                           if len(evals) > 1 else ""))
    if st["reason"]:
        print(f"reason: {st['reason']}")
    print(cli_runs.download_hint(st["run_id"]))
    return 0 if st["status"] == "done" else 1


def add_parsers(sub) -> None:
    st = sub.add_parser("status", help="a table of runs and workers on a coordinator")
    add_client_args(st)
    st.set_defaults(func=_run_status)
    t = sub.add_parser("train", help="run a federated job over a JSONL dataset")
    add_client_args(t)
    t.add_argument("--dataset", required=True, type=Path, help="training JSONL on this machine")
    t.add_argument("--eval-dataset", type=Path, default=None,
                   help="held-out JSONL (eval loss after each round)")
    t.add_argument("--run-id", default=None, help="continue this run instead of a new one")
    t.add_argument("--base-model", default="signal-tiny", help="base model of a new run")
    t.add_argument("--lora-r", type=positive(int), default=8, help="LoRA rank of a new run")
    t.add_argument("--rounds", type=positive(int), default=10, help="federated rounds")
    t.add_argument("--local-steps", type=positive(int), default=8,
                   help="AdamW steps each worker takes per round")
    t.add_argument("--batch-size", type=positive(int), default=8,
                   help="examples per local step")
    t.add_argument("--inner-learning-rate", type=positive(float), default=1e-3,
                   help="learning rate of the local steps")
    t.add_argument("--outer-optimizer", choices=["fedavg", "nesterov", "fedadam"],
                   default="fedavg", help="how the combined delta is applied")
    t.add_argument("--outer-learning-rate", type=positive(float), default=None,
                   help="outer learning rate (default: the optimizer's own: 1 for fedavg)")
    t.add_argument("--aggregator", choices=["mean", "trimmed_mean", "median"], default="mean",
                   help="how workers' deltas are combined")
    t.add_argument("--trim-fraction", type=float, default=0.2,
                   help="trimmed_mean: fraction cut at each end")
    t.add_argument("--num-tasks-per-round", "--tasks-per-round", dest="tasks_per_round",
                   type=positive(int), default=None,
                   help="train tasks per round (default: the coordinator's)")
    t.add_argument("--min-updates-per-round", type=positive(int), default=None,
                   help="accepted updates that close a round at its timeout (default: the "
                        "coordinator's)")
    t.add_argument("--round-timeout-s", "--round-timeout-sec", dest="round_timeout_s",
                   type=positive(float), default=None,
                   help="seconds before a round closes with what it has (default: the "
                        "coordinator's)")
    t.add_argument("--max-staleness", type=non_negative_int, default=0,
                   help="accept updates computed this many versions ago")
    t.add_argument("--delta-norm-max", type=positive(float), default=None,
                   help="reject deltas whose norm exceeds this (default: no limit)")
    t.add_argument("--codec", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                   help="encoding of the workers' deltas")
    t.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the run and of the data order")
    t.set_defaults(func=_run_train)
