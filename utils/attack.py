"""The one L-inf PGD engine: any loss, [0,1] pixel space, model in eval mode, gradients w.r.t. the input only.

A loss for the engine is a closure `loss_fn(model, x_adv) -> tensor` (summed before differentiation) that the
attack maximises; cross-entropy, TRADES-KL and the router losses are all such closures.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from models.layers.router import at_least_float32


@contextmanager
def eval_mode(*modules):
    """Put every module (and submodule) in eval mode; restore each submodule's own flag afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def attack_precision(x):
    """Autocast off: the attacks run in float32 inside a mixed-precision training step. Under bf16 the cast at the
    first conv erased 43% of TRADES' 0.001 * N(0,1) random start and the first step's gradient signs agreed with
    float32 on half of the pixels only (fp16: 76%); no GPU run has shown yet that robust accuracy survives that."""
    return torch.autocast(x.device.type, enabled=False)


def pgd_attack(model, x, loss_fn, *, eps, step_size, num_steps, random_start="uniform", generator=None):
    """L-inf PGD: maximise `loss_fn(model, x_adv)` within ||x_adv - x||_inf <= eps and [0,1].

    Args:
        eps, step_size: radius and signed-gradient step in [0,1] pixel units; num_steps: iterations.
        random_start: 'uniform' (U(-eps, eps), Madry), 'normal' (0.001 * N(0,1), TRADES) or 'none'.
    The model runs in eval mode (restored after); gradients are taken with respect to x_adv only, so
    parameters' .grad stay untouched. Grad mode is switched on internally, autocast off (`attack_precision`).
    Returns x_adv, detached.
    """
    if eps < 0 or step_size < 0 or num_steps < 0:
        raise ValueError(f"eps, step_size and num_steps must be >= 0 (got {eps}, {step_size}, {num_steps})")
    x = x.detach()
    if random_start == "uniform":
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    elif random_start == "normal":
        noise = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif random_start == "none":
        noise = torch.zeros_like(x)
    else:
        raise ValueError(f"random_start must be 'uniform', 'normal' or 'none', got {random_start!r}")
    x_adv = _project(x + noise, x, eps)
    with eval_mode(model), torch.enable_grad(), attack_precision(x):
        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model, x_adv).sum()
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = _project(x_adv.detach() + step_size * grad.to(x.dtype).sign(), x, eps)
    return x_adv.detach()


def _project(x_adv, x, eps):
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def ce_loss_fn(y):
    """Attack loss: summed cross-entropy of the model's logits against labels `y`."""
    def loss(model, x_adv):
        return F.cross_entropy(model(x_adv).float(), y, reduction="sum")
    return loss


def kl_divergence(logits_p, logits_q):
    """Summed KL(softmax(p) || softmax(q)) from log-probabilities (no NaN when a probability underflows), in
    float32 or wider (float64 logits stay float64: its gradient p - q cancels, and float32 loses digits there).

    The reference computed it from softmax targets under xlogy, whose backward is NaN at exact zeros.
    """
    log_q, log_p = F.log_softmax(at_least_float32(logits_q), dim=1), F.log_softmax(at_least_float32(logits_p), dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def trades_kl_loss_fn(logits_clean):
    """Attack loss of TRADES: KL(f(x) || f(x_adv)) summed, `logits_clean` fixed (detached)."""
    target = logits_clean.detach()

    def loss(model, x_adv):
        return kl_divergence(target, model(x_adv))
    return loss
