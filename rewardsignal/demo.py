"""`signal demo`: a coordinator and two workers on this machine, as separate
processes; a LoRA run on signal-tiny trained on the shipped chat dataset; samples
before and after; the adapter saved and downloaded; everything shut down."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rewardsignal.data import sample_examples
from rewardsignal.progress import ProgressBar

_ANNOUNCE = re.compile(r"signal coordinator listening on (http://\S+)")
_PROMPTS = ["What is 2 + 3?", "What colour is grass?", "What comes after 7?"]
_BATCH = 32


def _start_coordinator(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "rewardsignal.cli", "coordinator", "--port",
                             "0", "--data-dir", str(data_dir)], stdout=subprocess.PIPE,
                            stderr=log, text=True)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None  # stdout=PIPE
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = _ANNOUNCE.search(line or "")
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"coordinator did not start; see {log_path}")


def _chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)


def readable(text: str) -> str:
    """A sample as a person reads it: the untrained model emits control bytes
    (the byte tokenizer decodes them as-is), shown as "·" rather than escapes."""
    shown = "".join(c if c.isprintable() and c != "\ufffd" else "·"
                    for c in text.replace("\n", " "))
    return f'"{shown}"' if shown.strip("· ") else f'"{shown}" (no readable text yet)'


def run_demo(*, steps: int = 100, workers: int = 2, out_dir: Path = Path("./signal-demo")) -> int:
    from rewardsignal import SignalClient
    from rewardsignal.models import load_tokenizer, resolve_model_path

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "data", ignore_errors=True)
    shutil.rmtree(out_dir / "adapter", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("Building the built-in model signal-tiny (first run only)...", flush=True)
    resolve_model_path("signal-tiny")
    tok = load_tokenizer("signal-tiny")

    threads = max(1, (os.cpu_count() or 1) // workers)
    procs: list[subprocess.Popen] = []
    try:
        coord, url = _start_coordinator(out_dir / "data", out_dir / "coordinator.log")
        procs.append(coord)
        print(f"Coordinator up at {url} (log: {out_dir / 'coordinator.log'})", flush=True)
        for i in range(workers):
            log = open(out_dir / f"worker-{i}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rewardsignal.cli", "worker", "--coordinator", url,
                 "--name", f"demo-worker-{i}", "--device", "cpu", "--threads",
                 str(threads)], stdout=log, stderr=log))
        client = SignalClient(base_url=url)
        deadline = time.monotonic() + 120
        while len(client.list_workers()) < workers:
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not register; see {out_dir}/worker-*.log")
            time.sleep(0.2)
        print(f"{workers} workers registered: "
              + ", ".join(w["name"] for w in client.list_workers()), flush=True)

        # The built-in base is random-weight: lr 2e-3 and rank 32 learn the chat
        # format and most answers' shape in ~100 steps; higher rates diverge.
        run = client.create_run(base_model="signal-tiny", lora_r=32, lora_alpha=64,
                                learning_rate=2e-3, seed=0)
        prompts = [_chat_prompt(tok, q) for q in _PROMPTS]
        before = run.sample(prompts=prompts, temperature=0, max_tokens=24)["outputs"]

        examples = sample_examples()
        bar = ProgressBar(steps, desc="training")
        losses = []
        for step in range(steps):
            start = (step * _BATCH) % len(examples)
            batch = (examples + examples)[start:start + _BATCH]
            half = len(batch) // 2
            run.forward_backward(batch=batch[:half])
            run.forward_backward(batch=batch[half:])
            out = run.optim_step()
            losses.append(out["loss"])
            bar.update(1, loss=out["loss"], version=out["version"])

        after = run.sample(prompts=prompts, temperature=0, max_tokens=24)["outputs"]
        print("\nSamples (greedy), before -> after training:")
        for q, b, a in zip(_PROMPTS, before, after, strict=True):
            print(f"  Q: {q}\n     before: {readable(b)}\n     after:  {readable(a)}")
        art = run.save_state(mode="adapter", name="demo")
        local = run.download(art, out_dir / "adapter")
        first, last = losses[0], sum(losses[-3:]) / len(losses[-3:])
        print(f"\nLoss {first:.3f} -> {last:.3f} ({(1 - last / first) * 100:.0f}% lower; first "
              f"step -> mean of the last 3) over {steps} steps on {workers} workers; run "
              f"{run.run_id} is at version {out['version']}.")
        print(f"Adapter saved: {local.resolve()} (load it with PeftModel.from_pretrained)")
        print(f"Metrics were served at {url}/metrics while the demo ran.")
        client.close()
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        print("Coordinator and workers stopped.", flush=True)
