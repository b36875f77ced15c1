"""LoRA adapters (arXiv:2106.09685) for the decoders' linear layers: add them before training, fold
them back into plain weights before saving.

A tool: finetune.py imports it; it imports common.py (the decoders build every projection from
common.Linear, which is what add_lora wraps). Copy it with finetune.py to train low-rank updates.
"""
import math
from functools import partial

import torch
import torch.nn as nn

from common import Linear


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA, arXiv:2106.09685): y = W x +
    (alpha / r) B A x. B starts at zero, so training starts from the loaded model exactly."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype,
                                               device=weight.device))
        # A as the paper's code (loralib) and peft draw it: nn.Linear's default initialisation
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype,
                                               device=weight.device))

    def forward(self, x):  # (..., in) -> (..., out)
        low_rank = x @ self.lora_a.t()  # (..., r)
        update = low_rank @ self.lora_b.t()  # (..., out)
        return self.base(x) + update * self.scale

    def merged(self):
        """The base layer with the update folded into its weight, W + (alpha / r) B A (in fp32)."""
        with torch.no_grad():
            delta = self.lora_b.float() @ self.lora_a.float() * self.scale  # (out, in)
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def replace_modules(model, kind, make):
    """Every submodule of type `kind` replaced by make(submodule)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, make(module))


def add_lora(decoder, rank, alpha):
    """LoRA on each linear layer of the decoder (attention and MLP projections)."""
    replace_modules(decoder, Linear, partial(LoRALinear, rank=rank, alpha=alpha))


def merge_lora(model):
    """Every LoRA layer folded back into a plain linear layer: the model of the checkpoint keys."""
    replace_modules(model, LoRALinear, LoRALinear.merged)
