"""A task that runs out of memory is split into smaller micro-batches and retried."""

import torch

from rewardsignal.data.types import Datum
from rewardsignal.worker.engine import ForwardResult
from rewardsignal.worker.loop import Worker, WorkerConfig


def test_out_of_memory_halves_micro_batches_until_it_fits(capsys):
    w = Worker(WorkerConfig(coordinator="http://127.0.0.1:1", device="cpu",
                            micro_batch_tokens=4096))
    seen = []

    def fake_forward_backward(model, key, datums, loss_fn, cfg, *, backward, micro_tokens,
                              temperature=1.0):
        seen.append(micro_tokens)
        if micro_tokens > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return ForwardResult(1.0, 2.0, 3, [[0.0]], None)

    w.engine.forward_backward = fake_forward_backward
    datums = [Datum((1, 2), (2, 3), (1.0, 1.0))]
    res = w._with_oom_retry(None, "k", datums, {"loss_fn": "cross_entropy",
                                                 "loss_fn_config": {}}, True)
    assert seen == [4096, 2048, 1024]
    assert res.loss_sum == 1.0
    assert "out of memory; retrying with micro-batches of 1024 tokens" in capsys.readouterr().err
