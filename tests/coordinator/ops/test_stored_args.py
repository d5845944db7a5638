"""Every operation's arguments survive the trip a restart puts them through:
parse a body, store it (``dump`` -> JSON), read it back (``load``), and get the
same arguments. A new operation without an entry here fails the first test."""

from __future__ import annotations

import json

import pytest
from apphelpers import Harness

from rewardsignal.coordinator.federated.job import FederatedJob
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops import REGISTRY
from rewardsignal.coordinator.ops.evaluate import EvaluateArgs
from rewardsignal.coordinator.ops.forward import ForwardArgs

BODIES = {
    "forward_backward": {"batch": [{"text": "one two"}, {"input": "2+2=", "output": "4"}],
                         "reduction": "sum"},
    "forward": {"batch": [{"messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "yo"}]}]},
    "optim_step": {"learning_rate": 0.01, "beta1": 0.8, "grad_clip_norm": 1.5},
    "sample": {"prompts": ["The meaning"], "max_tokens": 5, "temperature": 0.5, "seed": 3,
               "num_samples": 4, "top_k": 20, "top_p": 0.9, "stop": ["\n", 2],
               "include_prompt_logprobs": True, "version": 0},
    "compute_logprobs": {"sequences": [[1, 5, 6, 7], [1, 9]], "version": 0},
    "evaluate": {"batch": [{"prompt": "2+2=", "completion": "4"}, {"text": "held out"}],
                 "version": 0},
    "save_state": {"mode": "merged", "name": "keep-me", "version": 0},
    "load_state": {"version": 0, "optimizer": True},
    "train_federated": {"examples": [{"text": "a b c"}] * 4, "rounds": 2, "local_steps": 1,
                        "batch_size": 2},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("ops") / "data")
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    yield h, h.coordinator.runs[run["run_id"]]
    h.close()


def test_every_operation_has_a_round_trip_case():
    assert set(BODIES) == set(REGISTRY)


def _comparable(args):
    if isinstance(args, ForwardArgs):
        return ([d.to_json() for d in args.datums], args.loss_fn, args.loss_fn_config,
                args.reduction)
    if isinstance(args, EvaluateArgs):
        return [d.to_json() for d in args.datums], args.version
    if isinstance(args, FederatedJob):
        return {"job_id": args.job_id}
    return args


@pytest.mark.parametrize("name", sorted(BODIES))
def test_arguments_round_trip_through_storage(setup, name):
    h, run = setup
    op = REGISTRY[name]
    services = h.coordinator.services
    body = Body(json.loads(json.dumps(BODIES[name])))
    args = h.call(op.parse(services, run, "local", body))
    body.done()  # every field of the sample body was read
    stored = json.loads(json.dumps(op.dump(args)))  # what the database holds
    loaded = op.load(services, run, stored)
    assert _comparable(loaded) == _comparable(args)


def test_recovered_answers_only_what_durable_state_shows(setup):
    _, run = setup
    assert REGISTRY["optim_step"].recovered(run, "req-x", {"request_id": "req-y"}) is None
    done = REGISTRY["optim_step"].recovered(run, "req-x", {"request_id": "req-x"})
    assert done is not None and done["recovered"] and done["version"] == run.version
    assert REGISTRY["load_state"].recovered(run, "req-x", {"request_id": "req-y"}) is None
    assert REGISTRY["load_state"].recovered(run, "req-x", {"request_id": "req-x"})["recovered"]
    assert REGISTRY["forward_backward"].recovered(run, "req-z", {}) is None
    run.recovered_grads.add("req-z")
    try:
        assert REGISTRY["forward_backward"].recovered(run, "req-z", {})["recovered"]
    finally:
        run.recovered_grads.discard("req-z")
    for name in ("forward", "sample", "compute_logprobs", "save_state", "train_federated"):
        assert REGISTRY[name].recovered(run, "req-x", {"request_id": "req-x"}) is None
