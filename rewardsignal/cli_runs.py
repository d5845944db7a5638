"""`signal runs list|delete`, `signal artifacts list`, `signal download`: a run's
life from the shell."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rewardsignal.cli_common import add_client_args, die, table


def _client(args: argparse.Namespace):
    from rewardsignal import SignalClient

    return SignalClient(api_key=args.api_key, base_url=args.coordinator, retry_window_s=5)


def _runs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        runs = client.list_runs()
    print(table(["RUN", "BASE MODEL", "VERSION", "LOSS", "LORA R", "CREATED"],
                [[r["run_id"], r["base_model"], r["version"],
                  f"{r['last_loss']:.4f}" if r.get("last_loss") is not None else None,
                  r["lora_r"], _when(r.get("created_at"))] for r in runs]))
    return 0


def _when(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else None


def _runs_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = client.run(args.run_id)
        info = run.info()  # 404 before asking anything
        saved = run.list_artifacts()
        if not args.yes:
            print(f"delete run {args.run_id} ({info['base_model']}, version {info['version']}, "
                  f"{len(saved)} saved state(s)) with its checkpoints, saved states, pending "
                  "requests and jobs? This cannot be undone. [y/N] ", end="", flush=True)
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                print("not deleted")
                return 1
        out = run.delete()
    print(f"deleted run {out['run_id']} ({out['requests_failed']} open request(s) failed, "
          f"{out['jobs_cancelled']} job(s) cancelled)")
    return 0


def _artifacts_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        saved = client.run(args.run).list_artifacts()
    print(table(["NAME", "VERSION", "MODE", "FILES", "BYTES", "PATH"],
                [[a["name"], a["version"], a["mode"], len(a["files"]),
                  f"{sum(f['bytes'] for f in a['files']):,d}", a["checkpoint_path"]]
                 for a in saved]))
    return 0


def _download(args: argparse.Namespace) -> int:
    if args.out.exists() and any(args.out.iterdir()):
        raise die(f"--out {args.out} exists and is not empty")
    with _client(args) as client:
        run = client.run(args.run)
        mode = "merged" if args.merged else "adapter"
        artifact = run.save_state(mode=mode, name=args.name, version=args.version)
        out = run.download(artifact, args.out)
    print(f"run {args.run} version {artifact['version']} ({mode}) -> {out}")
    return 0


def download_hint(run_id: str) -> str:
    """What `signal train` prints at the end."""
    return (f"download it: signal download --run {run_id} --out ./{run_id}-adapter "
            "(add --merged for a merged model)")


def add_parsers(sub) -> None:
    r = sub.add_parser("runs", help="list or delete your runs")
    rsub = r.add_subparsers(dest="runs_command", required=True)
    rl = rsub.add_parser("list", help="your runs on the coordinator")
    add_client_args(rl)
    rl.set_defaults(func=_runs_list)
    rd = rsub.add_parser("delete", help="delete a run, its checkpoints, saved states, pending "
                         "requests and jobs (asks first)")
    rd.add_argument("run_id", help="the run to delete")
    rd.add_argument("--yes", "-y", action="store_true",
                    help="do not ask for confirmation (default: ask)")
    add_client_args(rd)
    rd.set_defaults(func=_runs_delete)
    a = sub.add_parser("artifacts", help="a run's saved states")
    asub = a.add_subparsers(dest="artifacts_command", required=True)
    al = asub.add_parser("list", help="list a run's saved states")
    al.add_argument("--run", required=True, help="run id")
    add_client_args(al)
    al.set_defaults(func=_artifacts_list)
    d = sub.add_parser("download", help="save and download a run's adapter (or merged model)")
    d.add_argument("--run", required=True, help="run id")
    d.add_argument("--version", type=int, default=None,
                   help="version to export (default: the latest; older ones only while kept)")
    d.add_argument("--merged", action="store_true",
                   help="the adapter merged into the base model (default: a PEFT adapter)")
    d.add_argument("--name", default=None,
                   help="name of the saved state (default vNNNNNN, -merged when merged)")
    d.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    add_client_args(d)
    d.set_defaults(func=_download)
