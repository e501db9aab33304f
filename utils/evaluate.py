"""Test-time robustness of dense and MoE models: SA, PGD RA and the MoE dissection.

All attacks are L-inf PGD with a uniform random start on the model's own loss, in [0,1] pixel space,
model in eval mode (the reference's evaluation attacked a router-augmented loss instead: a defect).
The random start of batch b is drawn from a generator seeded with (seed, b), b counted in the single-process
order, so the result does not depend on the global RNG, on earlier batches or on how many processes share
the batches (with evaluation loaders from `utils.data.build_loaders`, whose ranks take whole batches).
For MoE models, RA is the per-image worst case of two PGD attacks on the whole MoE, both adversarial examples
judged by the whole MoE (routing recomputed on them): one through the router's straight-through gradient, one
with the routing held at the clean image's choice. The second keeps a router whose straight-through gradient is
useless (saturated, or logits so large that it swamps the experts' gradient) from masking the experts: such a
router once reported RA 85% where the experts alone kept 32%. `ra_ste` is the straight-through attack alone;
`ra_ste` well above `ra` means the router's gradient misleads gradient attacks. Besides these:
- router robustness: % of images whose expert choice survives PGD on the router's own decision;
- expert robustness: RA with the routing fixed to the clean image's choice (attacks the experts only);
- expert load: % of images per expert, clean and under the RA attack.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .attack import ce_loss_fn, eval_mode, pgd_attack

_COUNTS = ("n", "clean_correct", "adv_correct", "router_kept", "expert_adv_correct", "ste_adv_correct")


def _as_list(expert):
    return expert if isinstance(expert, list) else [expert]


def router_decision_loss_fn(clean_expert):
    """Attack loss on the routing itself: CE of the router logits against the clean choice (every layer)."""
    def loss(model, x_adv):
        if model.routing_mode == "global":
            return F.cross_entropy(model.route_scores(x_adv), clean_expert, reduction="sum")
        _, info = model(x_adv, return_routing=True)
        return sum(F.cross_entropy(lg, e, reduction="sum") for lg, e in zip(info.logits, clean_expert))
    return loss


def fixed_routing_ce_fn(y, clean_expert):
    """Cross-entropy of the MoE with its routing pinned to `clean_expert` (attacks the experts only)."""
    def loss(model, x_adv):
        return F.cross_entropy(model(x_adv, expert=clean_expert), y, reduction="sum")
    return loss


def _decision(model, x):
    with torch.no_grad():
        if model.routing_mode == "global":
            return model.route_scores(x).argmax(1)
        return model(x, return_routing=True)[1].expert


def _same_decision(a, b):
    kept = torch.ones_like(_as_list(a)[0], dtype=torch.bool)
    for ea, eb in zip(_as_list(a), _as_list(b)):
        kept &= ea == eb
    return kept


@torch.no_grad()
def _predict(model, x, **kw):
    return model(x, return_routing=True, **kw)


def _start_generator(seed, batch, device):
    """The random-start generator of (single-process) batch number `batch`."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)


def evaluate(model, loader, *, eps, step_size, num_steps, device, moe_metrics=None, max_batches=None,
             progress=True, reduce=None, desc="eval", seed=0, rank=0, world_size=1):
    """Evaluate on `loader`; returns percentages (and raw counts under 'counts').

    Args:
        loader: this process's batches: batches rank, rank + world_size, ... of the single-process order.
        eps, step_size: PGD radius and step in [0,1] pixel units; num_steps: PGD iterations.
        moe_metrics: compute the MoE dissection (default: when the model is an MoE).
        max_batches: evaluate the first max_batches batches of the single-process order (all ranks together).
        reduce: callable summing a tensor over processes (distributed evaluation), or None.
        seed: seeds the random starts (with the batch number).
    """
    routed = getattr(model, "is_moe", False)
    moe = routed if moe_metrics is None else moe_metrics and routed
    n_expert = model.n_expert if moe else 0
    counts = torch.zeros(len(_COUNTS), dtype=torch.float64)
    load_clean = torch.zeros(max(n_expert, 1), dtype=torch.float64)
    load_adv = torch.zeros_like(load_clean)
    with eval_mode(model):
        bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            batch_number = i * world_size + rank
            if max_batches is not None and batch_number >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            attack = dict(eps=eps, step_size=step_size, num_steps=num_steps, random_start="uniform",
                          generator=_start_generator(seed, batch_number, x.device))
            logits, info = _predict(model, x)
            x_adv = pgd_attack(model, x, ce_loss_fn(y), **attack)
            logits_adv, info_adv = _predict(model, x_adv)
            robust = logits_adv.argmax(1) == y
            batch = [len(y), (logits.argmax(1) == y).sum().item(), 0, 0, 0, robust.sum().item()]
            if routed:  # second attack, routing held at the clean choice; RA takes the worse of the two
                clean_expert = info.expert
                x_e = pgd_attack(model, x, fixed_routing_ce_fn(y, clean_expert), **attack)
                robust &= _predict(model, x_e)[0].argmax(1) == y
            batch[2] = robust.sum().item()
            if moe:
                x_r = pgd_attack(model, x, router_decision_loss_fn(clean_expert), **attack)
                batch[3] = _same_decision(_decision(model, x_r), clean_expert).sum().item()
                logits_e, _ = _predict(model, x_e, expert=clean_expert)
                batch[4] = (logits_e.argmax(1) == y).sum().item()
                for e in _as_list(clean_expert):
                    load_clean += torch.bincount(e.cpu(), minlength=n_expert).double()
                for e in _as_list(info_adv.expert):
                    load_adv += torch.bincount(e.cpu(), minlength=n_expert).double()
            counts += torch.tensor(batch, dtype=torch.float64)
            bar.set_postfix(sa=f"{100 * counts[1] / counts[0]:.1f}", ra=f"{100 * counts[2] / counts[0]:.1f}")
    if reduce is not None:
        counts, load_clean, load_adv = (reduce(t) for t in (counts, load_clean, load_adv))
    c = dict(zip(_COUNTS, counts.tolist()))
    n = max(c["n"], 1)
    out = {"sa": 100 * c["clean_correct"] / n, "ra": 100 * c["adv_correct"] / n, "n": int(c["n"]), "counts": c}
    if routed:
        out["ra_ste"] = 100 * c["ste_adv_correct"] / n
    if moe:
        out["router_robustness"] = 100 * c["router_kept"] / n
        out["expert_robustness"] = 100 * c["expert_adv_correct"] / n
        out["load_clean"] = (100 * load_clean / load_clean.sum().clamp(min=1)).tolist()
        out["load_adv"] = (100 * load_adv / load_adv.sum().clamp(min=1)).tolist()
    return out
