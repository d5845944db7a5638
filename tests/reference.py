"""The single-process reference: plain PEFT + torch.optim.AdamW on the whole batch.

Written independently of the worker engine (its own padding, its own loss via
``F.cross_entropy``) so that agreement between the two means something.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model, set_peft_model_state_dict

from rewardsignal.data.types import Datum
from rewardsignal.lora import LoraSpec, peft_config
from rewardsignal.models import load_model


class ReferenceTrainer:
    def __init__(self, model_id: str, spec: LoraSpec, adapter_v0: dict[str, torch.Tensor],
                 *, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.model = get_peft_model(load_model(model_id, dtype=dtype, device=device),
                                    peft_config(spec))
        set_peft_model_state_dict(self.model, {k: v.clone().to(self.device)
                                               for k, v in adapter_v0.items()})
        self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay)

    def mean_loss(self, datums: list[Datum]) -> torch.Tensor:
        return self.loss(datums, "mean")

    def loss(self, datums: list[Datum], reduction: str) -> torch.Tensor:
        """Weighted token cross-entropy: its ``sum``, or divided by the total
        |weight| (``mean``)."""
        width = max(len(d) for d in datums)
        ids = torch.zeros(len(datums), width, dtype=torch.long)
        tgt = torch.full((len(datums), width), -100, dtype=torch.long)
        w = torch.zeros(len(datums), width)
        for i, d in enumerate(datums):
            ids[i, : len(d)] = torch.tensor(d.input_ids)
            tgt[i, : len(d)] = torch.tensor(d.target_ids)
            w[i, : len(d)] = torch.tensor(d.weights)
        ids, tgt, w = ids.to(self.device), tgt.to(self.device), w.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=(tgt != -100).long()).logits
        nll = F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none",
                              ignore_index=-100)
        total = (nll * w).sum()
        return total if reduction == "sum" else total / w.abs().sum()

    def step(self, datums: list[Datum], reduction: str = "mean") -> float:
        self.opt.zero_grad()
        loss = self.loss(datums, reduction)
        loss.backward()
        self.opt.step()
        return float(loss)

    def adapter(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().float().cpu().clone() for k, v in
                get_peft_model_state_dict(self.model).items()}
