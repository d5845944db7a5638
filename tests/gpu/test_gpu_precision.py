"""Run precision and `--gpus` on a real GPU: a bf16 run and an nf4 (QLoRA) run
train through a coordinator and one GPU worker and their loss falls, with no
submission rejected (the worker's fingerprint of the base as it loaded it
matches the run's); the nf4 base's measured size is within 20% of the
estimate placement uses; and `signal-worker --gpus all` works on the box.
Skipped without CUDA (nf4 also without bitsandbytes).

``SIGNAL_TEST_GPU_DEVICE=cpu`` runs the bf16 case on CPU (to debug the test).
"""

from __future__ import annotations

import importlib.util
import signal
import sys

import pytest
import torch
from gpuenv import DEVICE, GPU_MARKS
from harness import Proc, start_coordinator, start_worker, wait_workers

from rewardsignal import SignalClient
from rewardsignal.data import sample_examples

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = GPU_MARKS

MODEL = "signal-small"
STEPS = 6
LR = 2e-3


@pytest.mark.parametrize("precision", [
    {"base_dtype": "bf16"},
    pytest.param({"base_dtype": "bf16", "quantization": "nf4"},
                 marks=pytest.mark.skipif(not HAS_BNB or not DEVICE.startswith("cuda"),
                                          reason="nf4 needs CUDA and bitsandbytes")),
], ids=["bf16", "nf4"])
def test_a_run_at_its_precision_trains_on_a_gpu_worker(tmp_path, precision):
    coord, url = start_coordinator(tmp_path / "data")
    worker = start_worker(url, "gpu0", "--device", DEVICE, "--max-tokens-per-task", "100000")
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 1, timeout_s=180)
        run = client.create_run(base_model=MODEL, lora_r=8, lora_alpha=16, learning_rate=LR,
                                seed=5, **precision)
        info = run.info()
        assert (info["base_dtype"], info["quantization"]) == (
            precision["base_dtype"], precision.get("quantization"))
        batch = sample_examples()[:16]
        losses = []
        for _ in range(STEPS):
            run.forward_backward(batch=batch)
            losses.append(run.optim_step()["loss"])
        st = client.status()
        print(f"\n{DEVICE} {MODEL} {precision}: losses {[round(x, 4) for x in losses]}; "
              f"rejections {st['rejections']}")
        assert losses[-1] < 0.8 * losses[0], losses
        assert st["rejections"] == {}
        assert st["workers"][0]["can_serve"] == [run.run_id]
    finally:
        client.close()
        worker.stop()
        coord.stop()


@pytest.mark.skipif(not HAS_BNB or not DEVICE.startswith("cuda"),
                    reason="nf4 needs CUDA and bitsandbytes")
def test_nf4_base_size_is_within_20_percent_of_the_estimate():
    from rewardsignal.memory import shape_of, weight_bytes
    from rewardsignal.models import load_model
    from rewardsignal.worker.model_cache import module_bytes

    for model_id in ("signal-small", "signal-1b"):
        model = load_model(model_id, dtype=torch.bfloat16, device="cuda", quantization="nf4")
        measured = module_bytes(model)
        estimate = weight_bytes(shape_of(model_id), "bf16", "nf4")
        bf16 = weight_bytes(shape_of(model_id), "bf16")
        print(f"\n{model_id} nf4: measured {measured:,} bytes, estimate {estimate:,} "
              f"({estimate / measured:.3f}x); bf16 estimate {bf16:,}")
        assert abs(estimate - measured) <= 0.2 * measured
        del model
        torch.cuda.empty_cache()


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="--gpus needs CUDA")
def test_gpus_all_on_this_box(tmp_path):
    coord, url = start_coordinator(tmp_path / "data")
    box = Proc([sys.executable, "-m", "rewardsignal.cli", "worker", "--coordinator", url,
                "--name", "box", "--gpus", "all"], "box")
    client = SignalClient(base_url=url)
    try:
        n = torch.cuda.device_count()
        wait_workers(url, n, timeout_s=180)
        workers = client.list_workers()
        assert sorted(w["name"] for w in workers) == [f"box-gpu{i}" for i in range(n)]
        assert all(w["device"].startswith("cuda") and w["hardware"].get("gpu_name")
                   for w in workers)
        run = client.create_run(base_model="signal-tiny", lora_r=4)
        run.forward_backward(batch=sample_examples()[:8])
        assert run.optim_step()["version"] == 1
        box.proc.send_signal(signal.SIGINT)
        assert box.proc.wait(timeout=60) == 0
        assert f"all {n} workers stopped; exit code 0" in box.output()
    finally:
        client.close()
        box.stop()
        coord.stop()
