"""`--evaluate --resume CKPT`: SA, PGD RA and the MoE dissection of a checkpoint, recorded in a run folder."""
import os
import time
from contextlib import nullcontext

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import LoaderConfig, build_loaders
from .distributed import DistEnv
from .errors import UsageError
from .evaluate import EvalConfig, Shard, evaluate, evaluate_per_expert, moe_row
from .lock import hold
from .runfiles import read_args, read_json, read_metrics
from .run import model_spec
from .runlog import RunLogger, check_can_create, record_unexpected_stop, run_dir
from .runtime import seed_everything
from .scalars import ScalarLog, summary_writer_class


def evaluate_checkpoint(args, script, device, env=DistEnv()):
    """Evaluate `args.resume` as the flags say (`--per-expert`: also every expert alone); returns the metrics row.
    Everything that can fail on bad input (arch, checkpoint, data, folder) fails before the run folder exists."""
    seed_everything(args.seed)
    ckpt = load_checkpoint(args.resume)
    _, _, test_loader, info = build_loaders(LoaderConfig.from_args(args, data_fraction=1.0), device, env.rank,
                                            env.world_size)
    # The checkpoint's model as the flags describe it (they must agree with what it records: arch, ratio, experts,
    # routing, MoE stages, top-k, normalisation).
    flags = {**model_spec(args, info).compared(), "normalize": bool(args.normalize)}
    model = model_from_checkpoint(ckpt, flags, info, sparse=args.sparse, source=args.resume).to(device)
    folder = run_dir(args, script, evaluate=True)
    check_can_create(folder, f"--save-dir {args.save_dir}")
    writer_class = summary_writer_class() if args.tensorboard else None  # before anything is written
    with hold(folder) if env.is_main else nullcontext():
        check_same_checkpoint(folder, args.resume)
        return _evaluate_in(folder, args, (model, test_loader, ckpt), writer_class, device, env)


def check_same_checkpoint(folder, resume):
    """UsageError when the evaluation folder `folder` holds the evaluation of another checkpoint: its
    args.yaml and provenance.json are that evaluation's record, not ours to replace."""
    done = {row.get("checkpoint") for row in read_metrics(os.path.join(folder, "metrics.jsonl"))}
    recorded = read_args(folder).get("resume") if os.path.exists(os.path.join(folder, "args.yaml")) else None
    cwd = (read_json(os.path.join(folder, "provenance.json")) or {}).get("cwd") or os.getcwd()
    if recorded:
        done.add(os.path.abspath(os.path.join(str(cwd), str(recorded))))
    others = sorted(str(c) for c in done - {None, os.path.abspath(resume)})
    if others:
        raise UsageError(f"{folder} holds the evaluation of another checkpoint ({others[0]}); use another "
                         f"--exp-identifier or --save-dir for {resume}")


def _evaluate_in(folder, args, loaded, writer_class, device, env):
    model, test_loader, ckpt = loaded
    with RunLogger(folder, args, is_main=env.is_main) as log:
        try:
            row = _evaluate_into(log, args, model, test_loader, ckpt, device, env)
            if writer_class is not None and env.is_main:
                scalar_log = ScalarLog(writer_class, folder)
                scalar_log.write(row, int(ckpt.get("epoch") or 0))
                scalar_log.close()
        except BaseException as e:
            record_unexpected_stop(log, e)
            raise
        log.set_status("finished")
    return row


def _evaluate_into(log, args, model, test_loader, ckpt, device, env):
    """Evaluate the loaded checkpoint and log its row."""
    t0 = time.time()
    cfg = EvalConfig.from_args(args, env.is_main)
    shard = Shard.of(env, device)
    ev = evaluate(model, test_loader, cfg, device, shard=shard, desc="test")
    per_expert = evaluate_per_expert(model, test_loader, cfg, device, shard=shard) if args.per_expert else {}
    row = {"checkpoint": os.path.abspath(args.resume), "epoch": ckpt.get("epoch"), "sa": ev["sa"],
           "ra": ev["ra"], "n": ev["n"], "eps": args.epsilon_test, "num_steps": args.num_steps_test,
           **moe_row(ev), **per_expert, "seconds": time.time() - t0}
    log.log_metrics(row)
    log.info(f"evaluate {args.resume}: SA {ev['sa']:.2f}% | RA {ev['ra']:.2f}% "
             f"(PGD-{args.num_steps_test}, eps {args.epsilon_test * 255:.1f}/255, {ev['n']} images)"
             + "".join(f" | {k} {v:.2f}%" for k, v in row.items()
                     if k.endswith("robustness") or k in ("ra_ste", "ra_routing_attack"))
             + "".join(f" | {k} " + "/".join(f"{v:.0f}" for v in row[k]) + "%"
                       for k in ("load_clean", "load_adv", "load_routing_attack") if k in row))
    for e, (sa, ra) in enumerate(zip(per_expert.get("per_expert_sa", []), per_expert.get("per_expert_ra", []))):
        log.info(f"  expert {e} alone (every image forced to it): SA {sa:.2f}% | RA {ra:.2f}% "
                 f"(routed: SA {ev['sa']:.2f}% | RA {ev['ra']:.2f}%)")
    return row
