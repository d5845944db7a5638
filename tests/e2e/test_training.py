"""The numerics rule end to end: a run trained through a real coordinator and N
real worker processes equals plain PEFT + torch.optim.AdamW in one process."""

from __future__ import annotations

import pytest
import torch
from harness import start_coordinator, start_worker, wait_workers
from peft import PeftModel
from reference import ReferenceTrainer

from rewardsignal import SignalClient
from rewardsignal.data import examples_to_datums, sample_examples
from rewardsignal.lora import LoraSpec
from rewardsignal.models import load_model, load_tokenizer, model_info
from rewardsignal.protocol import tensors_from_bytes

pytestmark = pytest.mark.slow

STEPS = 4
BATCH = 12
LR = 1e-3


@pytest.mark.parametrize("n_workers", [1, 3])
def test_distributed_training_equals_single_process_peft(tmp_path, n_workers):
    coord, url = start_coordinator(tmp_path / "data")
    workers = [start_worker(url, f"w{i}", "--max-tokens-per-task", "600")
               for i in range(n_workers)]
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, n_workers)
        run = client.create_run(base_model="signal-tiny", lora_r=4, lora_alpha=8,
                                learning_rate=LR, seed=3)
        v0 = tensors_from_bytes(client._loop.run(client._target._http(
            "GET", f"/v1/runs/{run.run_id}/weights/0", raw=True)))
        info = run.info()
        spec = LoraSpec(r=4, alpha=8.0, target_modules=tuple(info["lora_target_modules"]),
                        seed=3)
        assert set(spec.target_modules) == set(model_info("signal-tiny").default_target_modules)
        ref = ReferenceTrainer("signal-tiny", spec, v0, lr=LR)
        tok = load_tokenizer("signal-tiny")
        examples = sample_examples()

        for step in range(STEPS):
            batch = examples[step * BATCH:(step + 1) * BATCH]
            halves = (batch[: BATCH // 2], batch[BATCH // 2:])
            # Execute: two forward_backward calls then one step, through the workers.
            results = [run.forward_backward(batch=h) for h in halves]
            out = run.optim_step()
            # Reference: the same, in one process, on the whole batch.
            with torch.no_grad():
                want_halves = [float(ref.mean_loss(examples_to_datums(h, tok))) for h in halves]
            want_loss = ref.step(examples_to_datums(batch, tok))

            assert out["version"] == step + 1
            for got, want in zip(results, want_halves, strict=True):
                assert got["loss"] == pytest.approx(want, rel=1e-5)
                assert got["num_tokens"] > 0 and len(got["logprobs"]) == len(halves[0])
            assert out["loss"] == pytest.approx(want_loss, rel=1e-5)

        art = run.save_state(mode="adapter")
        assert art["version"] == STEPS
        local = run.download(art, tmp_path / "adapter")
        got_model = PeftModel.from_pretrained(load_model("signal-tiny"), str(local))
        from peft import get_peft_model_state_dict

        got = get_peft_model_state_dict(got_model)
        want = ref.adapter()
        assert got.keys() == want.keys()
        max_diff = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert max_diff <= 1e-5, max_diff
        assert max(float(want[k].abs().max()) for k in want if "lora_B" in k) > 1e-3  # it trained

        # Greedy sampling on a worker equals greedy generation with the downloaded adapter.
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                         tokenize=False, add_generation_prompt=True)
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        s = run.sample(prompt_tokens=[ids], temperature=0, max_tokens=12)
        with torch.no_grad():
            gen = got_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12,
                                     do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
        assert s["tokens"][0] == gen[0, len(ids):].tolist()
        assert s["outputs"][0] == tok.decode(s["tokens"][0], skip_special_tokens=True)

        busy = [w for w in client.list_workers() if w["tasks_completed"] > 0]
        assert len(busy) >= min(n_workers, 2), client.list_workers()
    finally:
        client.close()
        for w in workers:
            w.stop()
        coord.stop()
