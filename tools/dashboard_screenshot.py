"""Regenerate docs/dashboard.png: a coordinator and two workers on this machine,
a run trained like the demo plus a short federated job, then a headless
chromium screenshot of the dashboard."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _cluster import Cluster  # noqa: E402

from rewardsignal.data import sample_examples  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


def main() -> None:
    chromium = shutil.which("chromium") or sys.exit("needs chromium (apt-get install chromium)")
    ex = sample_examples()
    with Cluster(2, threads=1) as c:
        run = c.client.create_run(base_model="signal-tiny", lora_r=32, learning_rate=2e-3)
        for step in range(40):
            batch = (ex + ex)[step * 32 % len(ex):][:32]
            run.forward_backward(batch[:16])
            run.forward_backward(batch[16:])
            run.optim_step()
        fed = c.client.create_run(base_model="signal-tiny", lora_r=16, learning_rate=2e-3)
        fed.train_federated(ex[:200], eval_dataset=ex[200:], rounds=8, local_steps=8,
                            batch_size=8, outer_optimizer="nesterov",
                            tasks_per_round=2).wait(progress=False)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", f"--user-data-dir={profile}",
                            "--hide-scrollbars", "--window-size=1400,1000",
                            "--virtual-time-budget=5000", f"--screenshot={OUT}", c.url + "/"],
                           check=True, capture_output=True, timeout=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
