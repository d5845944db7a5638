"""The hosted API's quickstart, as users copy it: only the model id and the URL
differ (``SIGNAL_MODEL``, default ``signal-tiny``; ``SIGNAL_URL``, default
http://127.0.0.1:8000). tests/e2e/test_quickstart.py runs this file as is."""

import os

from rewardsignal import SignalClient

MODEL = os.environ.get("SIGNAL_MODEL", "signal-tiny")
URL = os.environ.get("SIGNAL_URL", "http://127.0.0.1:8000")

client = SignalClient(api_key="sk-...", base_url=URL)
models = client.list_models()
run = client.create_run(base_model=MODEL, lora_r=32, lora_alpha=64, learning_rate=3e-4)
batch = [{"input": "The quick brown fox jumps over the lazy dog."},
         {"output": "Machine learning is transforming technology."}]
for step in range(10):
    result = run.forward_backward(batch=batch)
    print(f"Step {step}: Loss = {result['loss']:.4f}")
    run.optim_step()
    if step % 5 == 0:
        samples = run.sample(prompts=["The meaning of life is"], temperature=0.7)
        print(samples["outputs"][0])
artifact = run.save_state(mode="adapter", push_to_hub=False)
print(artifact["checkpoint_path"])
