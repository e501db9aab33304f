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

from models.layers import MoEConv2d
from .attack import ce_loss_fn, eval_mode, pgd_attack

_COUNTS = ("n", "clean_correct", "adv_correct", "router_kept", "expert_adv_correct", "ste_adv_correct")


def _as_list(expert):
    return expert if isinstance(expert, list) else [expert]


def _decision_ce(logits, expert):
    """Summed CE of router logits against chosen experts: (B,) top-1 choices, or (B, k) top-k ones (each counts)."""
    if expert.dim() == 2:
        return -F.log_softmax(logits.float(), dim=1).gather(1, expert).sum()
    return F.cross_entropy(logits, expert, reduction="sum")


def router_decision_loss_fn(clean_expert):
    """Attack loss on the routing itself: CE of the router logits against the clean choice (every layer)."""
    def loss(model, x_adv):
        if model.routing_mode == "global":
            return _decision_ce(model.route_scores(x_adv), clean_expert)
        _, info = model(x_adv, return_routing=True)
        return sum(_decision_ce(lg, e) for lg, e in zip(info.logits, clean_expert))
    return loss


def fixed_routing_ce_fn(y, clean_expert, clean_gate=None):
    """Cross-entropy of the MoE with its routing pinned to `clean_expert` (attacks the experts only); with
    top-k routing, `clean_gate` pins the experts' weights too."""
    def loss(model, x_adv):
        return F.cross_entropy(model(x_adv, expert=clean_expert, gate=clean_gate), y, reduction="sum")
    return loss


def _decision(model, x):
    with torch.no_grad():
        if model.routing_mode == "global":
            scores = model.route_scores(x)
            return scores.argmax(1) if model.top_k == 1 else scores.topk(model.top_k, dim=1).indices
        return model(x, return_routing=True)[1].expert


def _same_decision(a, b):
    kept = None
    for ea, eb in zip(_as_list(a), _as_list(b)):
        # top-k: the same set of experts, whatever their order
        same = (ea == eb) if ea.dim() == 1 else (ea.sort(dim=1).values == eb.sort(dim=1).values).all(dim=1)
        kept = same if kept is None else kept & same
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
                x_e = pgd_attack(model, x, fixed_routing_ce_fn(y, clean_expert, info.gate), **attack)
                robust &= _predict(model, x_e)[0].argmax(1) == y
            batch[2] = robust.sum().item()
            if moe:
                x_r = pgd_attack(model, x, router_decision_loss_fn(clean_expert), **attack)
                batch[3] = _same_decision(_decision(model, x_r), clean_expert).sum().item()
                logits_e, _ = _predict(model, x_e, expert=clean_expert, gate=info.gate)
                batch[4] = (logits_e.argmax(1) == y).sum().item()
                for e in _as_list(clean_expert):  # top-k: each image counts once for each of its k experts
                    load_clean += torch.bincount(e.cpu().reshape(-1), minlength=n_expert).double()
                for e in _as_list(info_adv.expert):
                    load_adv += torch.bincount(e.cpu().reshape(-1), minlength=n_expert).double()
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


def forced_routing(model, expert: int, batch: int, device):
    """Routing that sends every image of a batch of `batch` to expert `expert` in every MoE layer (the `expert=`
    argument of an MoE's forward; the router is not asked)."""
    chosen = torch.full((batch,), expert, dtype=torch.long, device=device)
    if model.routing_mode == "layer":
        return [chosen] * sum(isinstance(m, MoEConv2d) for m in model.modules())
    return chosen


def evaluate_per_expert(model, loader, *, eps, step_size, num_steps, device, max_batches=None, progress=True,
                        reduce=None, seed=0, rank=0, world_size=1):
    """SA and PGD RA of every expert on its own: every image forced to expert e in every MoE layer.

    Returns {"per_expert_sa": [...], "per_expert_ra": [...]} (% per expert). The PGD attack (uniform start, the
    same per batch as `evaluate`'s) maximises the cross-entropy of the forced model, so expert e's numbers are
    those of an MoE whose router always picks e. Arguments as in `evaluate`.
    """
    counts = torch.zeros(model.n_expert, 2, dtype=torch.float64)  # (N, [clean correct, adversarial correct])
    n = torch.zeros(1, dtype=torch.float64)
    with eval_mode(model):
        bar = tqdm(loader, desc="per expert", leave=False, disable=not progress, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            batch_number = i * world_size + rank
            if max_batches is not None and batch_number >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for e in range(model.n_expert):
                forced = forced_routing(model, e, len(y), x.device)
                x_adv = pgd_attack(model, x, fixed_routing_ce_fn(y, forced), eps=eps, step_size=step_size,
                                   num_steps=num_steps, random_start="uniform",
                                   generator=_start_generator(seed, batch_number, x.device))
                with torch.no_grad():
                    counts[e, 0] += (model(x, expert=forced).argmax(1) == y).sum().item()
                    counts[e, 1] += (model(x_adv, expert=forced).argmax(1) == y).sum().item()
            n += len(y)
    if reduce is not None:
        counts, n = reduce(counts), reduce(n)
    pct = (100 * counts / n.clamp(min=1)).T.tolist()
    return {"per_expert_sa": pct[0], "per_expert_ra": pct[1]}
