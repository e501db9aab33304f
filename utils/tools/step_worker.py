"""One side of `python -m utils.tools.benchmark --steps`: times training steps of ONE source tree, on request.

Started by the benchmark as `python step_worker.py TREE CONFIG_JSON` with TREE's own `models` and `utils` first on
the path, so a git worktree of main (`--against DIR`) is timed with its own code and this tree with its own. It
uses only what every tree has had (`models.build_model`, `utils.flops.make_train_step`); this file imports nothing
of the tree it lives in. Protocol on stdin/stdout, one line each: it prints `ready` once its models are built and
warmed up, then for every line `I` (a row index) runs one training step of row I and prints its wall and CPU seconds (this process's);
`quit` (or the end of stdin) ends it.

CONFIG_JSON: {"rows": [[kind, ratio, n_expert], ...], "image_size", "batch", "num_steps", "threads", "warmup",
"channels_last"}; kind "dense" (resnet18_cifar_ori, TRADES) or "moe" (resnet18_cifar_moe, AdvMoE).
"""
import json
import sys
import time


def build_steps(cfg):
    """[(step, x, y)] of the configured rows: each model built from seed 0, batch from seed 0, lr 0 (the weights stay
    as built; BatchNorm statistics move as in training)."""
    import torch
    import models
    from utils.flops import make_train_step
    g = torch.Generator().manual_seed(0)
    size, batch = cfg["image_size"], cfg["batch"]
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out = []
    for kind, ratio, n_expert in cfg["rows"]:
        torch.manual_seed(0)
        if kind == "dense":
            model = models.build_model("resnet18_cifar_ori", ratio=ratio)
        else:
            model = models.build_model("resnet18_cifar_moe", ratio=ratio, n_expert=n_expert)
        if cfg["channels_last"]:  # what `--channels-last` does on CPU, in the tree's own code
            from utils.gpu import configure_backends
            configure_backends(torch.device("cpu"), model, channels_last=True)
        step = make_train_step(model.train(), num_steps=cfg["num_steps"], eps=0.1, step_size=0.0625)
        out.append((step, x, y))
    return out


def main(tree, config):
    sys.path[:1] = [tree]  # the tree's own packages, not this file's folder
    cfg = json.loads(config)
    import torch
    torch.set_num_threads(cfg["threads"])
    steps = build_steps(cfg)
    for _ in range(cfg["warmup"]):
        for step, x, y in steps:
            step(x, y)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        step, x, y = steps[int(line)]
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        print(f"{time.perf_counter() - t0:.6f} {time.process_time() - c0:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
