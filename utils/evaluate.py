"""Test-time robustness of dense and MoE models: SA, PGD RA and the MoE dissection.

All attacks are L-inf PGD with a uniform random start on the model's own loss, in [0,1] pixel space,
model in eval mode (the reference's evaluation attacked a router-augmented loss instead: a defect).
The random start of batch b is drawn from a generator seeded with (seed, b), b counted in the single-process
order, so the result does not depend on the global RNG, on earlier batches or on how many processes share
the batches (with evaluation loaders from `utils.data.build_loaders`, whose ranks take whole batches).
For MoE models, RA is the per-image worst case of three PGD attacks, all three adversarial examples judged by the
whole MoE (routing recomputed on them): one on the MoE's loss through the router's straight-through gradient, one
on the MoE's loss with the routing held at the clean image's choice, and the routing attack, which maximises the
router's cross-entropy against its clean choice (pushes every image towards another expert). The second keeps a
router whose straight-through gradient is useless (saturated, or logits so large that it swamps the experts'
gradient) from masking the experts: such a router once reported RA 85% where the experts alone kept 32%. The
third finds the images that a flip of the routing alone breaks, which neither loss attack needs to see when the
experts' loss is flat (saturated) around the image. `ra_ste` is the straight-through attack alone (`ra_ste` well
above `ra` means the router's gradient misleads gradient attacks), `ra_routing_attack` the routing attack alone.
Besides these:
- router robustness: % of images whose expert choice survives the routing attack (the same examples as
  `ra_routing_attack`);
- expert robustness: RA with the routing fixed to the clean image's choice (attacks the experts only);
- expert load: % of images per expert, clean, under the straight-through attack (`load_adv`) and under the
  routing attack (`load_routing_attack`).
`routing_report` tells how the router treats training images, with and without augmentation (per epoch).
"""
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.layers import MoEConv2d, selection_scores
from models.spec import is_moe
from .attack import ce_loss_fn, eval_mode, pgd_attack
from .balance import router_logits_on
from .distributed import all_reduce_sum
from .runfiles import MOE_KEYS
from .runtime import eval_start_seed

COLLAPSE_SHARE = 95.0  # % of images on one expert that we call a load collapse


@dataclass(frozen=True)
class EvalConfig:
    """The test attack and how much to evaluate.

    eps, step_size: PGD radius and step in [0,1] pixel units; num_steps: PGD iterations.
    seed: seeds every batch's random start, with the batch number (`runtime.eval_start_seed`).
    max_batches: evaluate the first max_batches batches of the single-process order (all processes together).
    """
    eps: float
    step_size: float
    num_steps: int
    seed: int = 0
    max_batches: int | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args, is_main=True):
        return cls(eps=args.epsilon_test, step_size=args.step_size_test, num_steps=args.num_steps_test,
                   seed=args.seed, max_batches=args.max_test_batches, progress=not args.no_progress and is_main)


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation: batches rank, rank + world_size, ... of the single-process order;
    `reduce(tensor)` sums a tensor over the processes (None: one process)."""
    rank: int = 0
    world_size: int = 1
    reduce: Callable | None = None

    @classmethod
    def of(cls, env, device):
        """This process's shard of a run's processes (`utils.distributed.DistEnv`), summing on `device`."""
        reduce = (lambda t: all_reduce_sum(t, env, device)) if env.enabled else None
        return cls(env.rank, env.world_size, reduce)


@dataclass
class Counts:
    """What the evaluation of some images counted (a batch, or the sum of batches: `+`)."""
    n: int = 0
    clean_correct: int = 0
    adv_correct: int = 0  # robust under the worst of the straight-through, fixed-routing and routing attacks (MoE)
    ste_adv_correct: int = 0  # robust under the straight-through attack alone (MoE) or PGD (dense)
    route_adv_correct: int = 0  # robust under the routing attack alone (MoE)
    router_kept: int = 0  # expert choice unchanged by the routing attack
    expert_adv_correct: int = 0  # robust with the routing fixed at the clean choice
    load_clean: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))  # (N,) images
    load_adv: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    load_route_adv: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))

    def __add__(self, other):
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def reduced(self, reduce):
        """These counts summed over processes (one collective)."""
        names = [f.name for f in fields(self) if not f.name.startswith("load")]
        loads = [f.name for f in fields(self) if f.name.startswith("load")]
        packed = torch.cat([torch.tensor([getattr(self, k) for k in names], dtype=torch.float64),
                            *(getattr(self, k) for k in loads)])
        packed = reduce(packed).cpu()
        scalars = {name: int(v) for name, v in zip(names, packed[:len(names)].tolist())}
        parts = packed[len(names):].split([len(getattr(self, k)) for k in loads])
        return Counts(**scalars, **dict(zip(loads, parts)))


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


def forced_routing(model, expert: int, batch: int, device):
    """Routing that sends every image of a batch of `batch` to expert `expert` in every MoE layer (the `expert=`
    argument of an MoE's forward; the router is not asked)."""
    chosen = torch.full((batch,), expert, dtype=torch.long, device=device)
    if model.routing_mode == "layer":
        return [chosen] * sum(isinstance(m, MoEConv2d) for m in model.modules())
    return chosen


def _load(expert, n_expert):
    """(N,) images per expert of a routing decision; top-k: each image counts once for each of its k experts."""
    load = torch.zeros(n_expert, dtype=torch.float64)
    for e in _as_list(expert):
        load += torch.bincount(e.cpu().reshape(-1), minlength=n_expert).double()
    return load


def attack_batch(model, x, y, cfg: EvalConfig, generator_seed: int, moe_metrics: bool) -> Counts:
    """Attack one batch (x in [0,1], labels y) and count: clean and robust correct, and for an MoE the
    straight-through attack and the routing attack alone; with `moe_metrics`, the dissection (router robustness,
    expert robustness, loads). The attacks draw their random starts in turn from one generator seeded with
    `generator_seed` (straight-through, fixed routing, routing attack: the dissection adds no draw)."""
    routed = is_moe(model)
    generator = torch.Generator(device=x.device).manual_seed(generator_seed)

    def attack(loss_fn):
        return pgd_attack(model, x, loss_fn, eps=cfg.eps, step_size=cfg.step_size, num_steps=cfg.num_steps,
                          random_start="uniform", generator=generator)

    logits, info = _predict(model, x)
    x_adv = attack(ce_loss_fn(y))  # through the router's straight-through gradient, for an MoE
    logits_adv, info_adv = _predict(model, x_adv)
    robust = logits_adv.argmax(1) == y
    counts = Counts(n=len(y), clean_correct=(logits.argmax(1) == y).sum().item(),
                    ste_adv_correct=robust.sum().item())
    if routed:  # RA takes the per-image worst of the straight-through, fixed-routing and routing attacks
        clean_expert = info.expert
        x_e = attack(fixed_routing_ce_fn(y, clean_expert, info.gate))
        robust &= _predict(model, x_e)[0].argmax(1) == y
        x_r = attack(router_decision_loss_fn(clean_expert))  # the routing attack, judged by the whole MoE
        logits_r, info_r = _predict(model, x_r)
        route_robust = logits_r.argmax(1) == y
        counts.route_adv_correct = route_robust.sum().item()
        robust &= route_robust
    counts.adv_correct = robust.sum().item()
    if routed and moe_metrics:
        counts.router_kept = _same_decision(info_r.expert, clean_expert).sum().item()
        logits_e, _ = _predict(model, x_e, expert=clean_expert, gate=info.gate)
        counts.expert_adv_correct = (logits_e.argmax(1) == y).sum().item()
        counts.load_clean = _load(clean_expert, model.n_expert)
        counts.load_adv = _load(info_adv.expert, model.n_expert)
        counts.load_route_adv = _load(info_r.expert, model.n_expert)
    return counts


def _batches(loader, cfg: EvalConfig, shard: Shard, device, desc):
    """(batch number in the single-process order, x, y) of this process's batches, on `device`, with a bar."""
    bar = tqdm(loader, desc=desc, leave=False, disable=not cfg.progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        batch_number = i * shard.world_size + shard.rank
        if cfg.max_batches is not None and batch_number >= cfg.max_batches:
            break
        yield batch_number, x.to(device, non_blocking=True), y.to(device, non_blocking=True), bar


def evaluate(model, loader, cfg: EvalConfig, device, *, moe_metrics=None, shard=Shard(), desc="eval"):
    """SA and PGD RA of `model` on `loader` (this process's batches, see `Shard`), and for an MoE the
    dissection (`moe_metrics`, default: when the model is an MoE). Returns percentages, `n` and the summed
    `counts` (a `Counts`)."""
    routed = is_moe(model)
    moe = routed if moe_metrics is None else moe_metrics and routed
    total = Counts(**{f.name: torch.zeros(model.n_expert if moe else 1, dtype=torch.float64)
                      for f in fields(Counts) if f.name.startswith("load")})
    with eval_mode(model):
        for batch_number, x, y, bar in _batches(loader, cfg, shard, device, desc):
            total = total + attack_batch(model, x, y, cfg, eval_start_seed(cfg.seed, batch_number), moe)
            bar.set_postfix(sa=f"{100 * total.clean_correct / total.n:.1f}",
                            ra=f"{100 * total.adv_correct / total.n:.1f}")
    if shard.reduce is not None:
        total = total.reduced(shard.reduce)
    n = max(total.n, 1)
    out = {"sa": 100 * total.clean_correct / n, "ra": 100 * total.adv_correct / n, "n": total.n, "counts": total}
    if routed:
        out["ra_ste"] = 100 * total.ste_adv_correct / n
        out["ra_routing_attack"] = 100 * total.route_adv_correct / n
    if moe:
        out["router_robustness"] = 100 * total.router_kept / n
        out["expert_robustness"] = 100 * total.expert_adv_correct / n
        for key, load in (("load_clean", total.load_clean), ("load_adv", total.load_adv),
                          ("load_routing_attack", total.load_route_adv)):
            out[key] = (100 * load / load.sum().clamp(min=1)).tolist()
    return out


def moe_row(ev, prefix=""):
    """The MoE dissection of an `evaluate` result as metrics-row fields (`prefix` + name), with `collapse`: one
    expert takes `COLLAPSE_SHARE`% or more of the clean images."""
    row = {}
    for k in MOE_KEYS:
        if k in ev:
            row[prefix + k] = ev[k]
    if "load_clean" in ev and len(ev["load_clean"]) > 1:
        row[prefix + "collapse"] = max(ev["load_clean"]) >= COLLAPSE_SHARE
    return row


def evaluate_per_expert(model, loader, cfg: EvalConfig, device, *, shard=Shard()):
    """SA and PGD RA of every expert on its own: every image forced to expert e in every MoE layer.

    Returns {"per_expert_sa": [...], "per_expert_ra": [...]} (% per expert). The PGD attack (uniform start, the
    same per batch as `evaluate`'s) maximises the cross-entropy of the forced model, so expert e's numbers are
    those of an MoE whose router always picks e.
    """
    clean_correct = torch.zeros(model.n_expert, dtype=torch.float64)  # (N,)
    adv_correct = torch.zeros(model.n_expert, dtype=torch.float64)  # (N,)
    n = torch.zeros(1, dtype=torch.float64)
    with eval_mode(model):
        for batch_number, x, y, _ in _batches(loader, cfg, shard, device, "per expert"):
            for e in range(model.n_expert):
                forced = forced_routing(model, e, len(y), x.device)
                start = torch.Generator(device=x.device).manual_seed(eval_start_seed(cfg.seed, batch_number))
                x_adv = pgd_attack(model, x, fixed_routing_ce_fn(y, forced), eps=cfg.eps, step_size=cfg.step_size,
                                   num_steps=cfg.num_steps, random_start="uniform", generator=start)
                with torch.no_grad():
                    clean_correct[e] += (model(x, expert=forced).argmax(1) == y).sum().item()
                    adv_correct[e] += (model(x_adv, expert=forced).argmax(1) == y).sum().item()
            n += len(y)
    if shard.reduce is not None:
        clean_correct, adv_correct, n = (shard.reduce(t) for t in (clean_correct, adv_correct, n))
    n = n.clamp(min=1)
    return {"per_expert_sa": (100 * clean_correct / n).tolist(), "per_expert_ra": (100 * adv_correct / n).tolist()}


SATURATED = 0.99  # chosen expert's softmax probability above which the straight-through gradient has all but died


@torch.no_grad()
def routing_report(model, plain, augmented):
    """How the router treats training images without (`plain`) and with (`augmented`) augmentation, both
    (P, C, H, W) in [0, 1] on the model's device. Returns percentages per expert (`load_train_plain`,
    `load_train_aug`: they should agree when the router routes on content, not on the crop), the logit scale
    (`router_logit_absmax`, the median and 95th percentile of the top-1 minus top-2 selection-score margin) and
    `router_saturated`, the % of images whose chosen expert's softmax probability exceeds 0.99 (the router then
    hardly learns from the loss). Per-layer routing: loads and scales over every layer's decisions.
    """
    n = model.n_expert
    out = {}
    for key, x in (("plain", plain), ("aug", augmented)):
        pairs = router_logits_on(model, x)
        experts = torch.cat([selection_scores(lg, r.balance.select_bias).argmax(1) for r, lg in pairs])
        out[f"load_train_{key}"] = (100 * torch.bincount(experts.cpu(), minlength=n).double() / len(experts)).tolist()
        if key == "plain":
            logits = torch.cat([lg.float() for _, lg in pairs])  # (layers * P, N)
            scores = torch.cat([selection_scores(lg, r.balance.select_bias).float() for r, lg in pairs])
            top = scores.topk(min(2, n), dim=1).values
            margin = (top[:, 0] - top[:, -1]).cpu()
            chosen = F.softmax(logits, dim=1).gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
            out.update({"router_logit_absmax": logits.abs().max().item(),
                        "router_margin_p50": margin.quantile(0.5).item(),
                        "router_margin_p95": margin.quantile(0.95).item(),
                        "router_saturated": 100 * (chosen > SATURATED).float().mean().item()})
    if model.routing_mode == "global":
        out["select_bias"] = model.router.balance.select_bias.tolist()
    return out
