"""bitsandbytes' 8-bit AdamW for bf16 weights: updates go through a Kahan compensation buffer, so a weight
still moves when each step's update is smaller than its bf16 rounding step (plain 8-bit AdamW on bf16 weights
loses those updates and stalls at small learning rates)."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch


class AdamW8bitKahan(bnb.optim.AdamW8bit):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, stabilize: bool = False, min_8bit_size: int = 4096):
        """stabilize: StableAdamW-style update clipping, each tensor's lr divided by max(1, RMS(g / sqrt(v))).
        Tensors under min_8bit_size elements keep 32-bit states, as in bitsandbytes."""
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         min_8bit_size=min_8bit_size)
        self.stabilize = stabilize

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        state = self.state[p]
        if "compensation" not in state:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        compensation = state["compensation"]
        weights = p.data
        lr, weight_decay = group["lr"], group["weight_decay"]
        compensation.add_(weights, alpha=-lr * weight_decay)  # decoupled decay, through the same compensation
        group["weight_decay"] = 0.0
        if self.stabilize:
            group["lr"] = lr / max(1.0, self._update_rms(p, group))
        p.data = compensation  # the kernel adds this step's update to the compensation buffer
        try:
            super().update_step(group, p, gindex, pindex)
        finally:
            p.data = weights
            group["lr"], group["weight_decay"] = lr, weight_decay
        exact = weights.float() + compensation.float()
        weights.copy_(exact)
        compensation.copy_(exact - weights.float())  # what bf16 rounding dropped, applied next step

    def _update_rms(self, p, group) -> float:
        """RMS of g / sqrt(v) with v the second moment after this step's gradient (bias-corrected)."""
        state = self.state[p]
        beta2 = group["betas"][1]
        second_moment = state["state2"]
        if second_moment.dtype == torch.uint8:
            second_moment = bnb_functional.dequantize_blockwise(second_moment, absmax=state["absmax2"],
                                                                code=state["qmap2"], blocksize=256)
        grad = p.grad.float()
        step = state["step"] + 1
        v = (beta2 * second_moment.float() + (1 - beta2) * grad.square()) / (1 - beta2 ** step)
        return float(grad.square().div(v.clamp(min=group["eps"] ** 2)).mean().sqrt())
