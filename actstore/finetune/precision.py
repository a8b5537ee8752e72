"""Mixed precision for the adapter: the model computes in the base model's dtype, the optimizer in float32.

On a CPU with native bf16, LoRA layers kept in float32 beside a bf16 base cost 6x the base model's own
forward (casts and float32 matmuls in every projection); in bf16 they cost almost nothing. Updating
bf16 weights directly would lose small steps to rounding, so the optimizer holds float32 master copies:
gradients are added up into them, the step is taken on them, and the model receives them rounded.
"""

from __future__ import annotations

import torch


class MasterWeights:
    """Float32 master copies of a model's trainable parameters, by parameter name."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._pairs = [(name, p, p.detach().float().clone().requires_grad_(True))
                       for name, p in model.named_parameters() if p.requires_grad]

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [master for _, _, master in self._pairs]

    def zero_grad(self) -> None:
        for _, p, master in self._pairs:
            p.grad = master.grad = None

    def collect_grads(self) -> None:
        """Add the model's gradients (of one micro-batch) into the masters, in float32."""
        for _, p, master in self._pairs:
            if p.grad is None:
                continue
            master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad.float())
            p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """Copy the masters into the model (rounded to its dtype)."""
        for _, p, master in self._pairs:
            p.copy_(master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: master.detach() for name, _, master in self._pairs}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, _, master in self._pairs:
            master.copy_(state[name])
        self.push()
