"""MoE layers and routing: sparse == dense-masked, straight-through router gradients, the reference
weight layout checked by hand, router/backbone parameter split, per-layer routing."""
import re

import pytest
import torch
import torch.nn.functional as F

import models
from conftest import forward_backward, moe_convs, seeded, spread_router
from models.layers import LayerRouter, MoEConv2d, Routing, hard_top1

RATIO, CLASSES = 0.125, 5
# Representatives: basic and bottleneck ResNets (dense vs MoE shortcuts), both WRN stems; every other
# family in the registry joins with its first MoE arch.
PREFERRED = ["resnet18_cifar_moe", "resnet50_imagenet_moe", "wrn_28_4_cifar_moe", "wrn_28_4_imagenet_moe"]
MOE_ARCHS = [a for a in models.list_models() if models.is_moe(a)]


def family(arch):
    return re.match(r"[a-z]+", arch).group(0)


def representatives():
    archs = [a for a in PREFERRED if a in MOE_ARCHS]
    covered = {family(a) for a in archs}
    for arch in MOE_ARCHS:
        if family(arch) not in covered:
            archs.append(arch)
            covered.add(family(arch))
    return archs


def input_size(arch):
    return 64 if "imagenet" in arch else 32


def layer_routers(model):
    return [m for m in model.modules() if isinstance(m, LayerRouter)]


def build(arch, n_expert, routing="global", sparse=True, seed=0):
    torch.manual_seed(seeded(seed))
    return models.build_model(arch, num_classes=CLASSES, ratio=RATIO, n_expert=n_expert, routing=routing,
                              sparse=sparse)


def rel_err(a, b):
    """Norm-wise relative difference of two tensors (0 when both are zero)."""
    scale = max(a.norm().item(), b.norm().item())
    return 0.0 if scale == 0 else (a - b).norm().item() / scale


def forced_experts(n_expert, batch):
    """A fixed assignment that leaves expert 1 without images (N=1: everything to expert 0)."""
    if n_expert == 1:
        return torch.zeros(batch, dtype=torch.long)
    if n_expert == 2:
        return torch.zeros(batch, dtype=torch.long)  # expert 1 idle
    choices = torch.tensor([e for e in range(n_expert) if e != 1])
    return choices[torch.arange(batch) % len(choices)].flip(0)  # mixed, unsorted, expert 1 idle


def bias_against(model, loser):
    """Make expert `loser` lose every routing decision (global router or every layer router)."""
    fcs = [model.router.fc] if model.routing_mode == "global" else [r.fc for r in layer_routers(model)]
    with torch.no_grad():
        for fc in fcs:
            fc.bias[loser] = -100.0


SCENARIOS = ["router", "router_mixed", "forced_idle_expert", "router_idle_expert"]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("routing", ["global", "layer"])
@pytest.mark.parametrize("n_expert", [1, 2, 4])
@pytest.mark.parametrize("arch", representatives())
def test_sparse_equals_dense_masked(arch, n_expert, routing, scenario):
    if n_expert == 1 and scenario == "router_idle_expert":
        pytest.skip("one expert always wins")
    batch = 6
    sparse = build(arch, n_expert, routing, sparse=True).double()
    dense = build(arch, n_expert, routing, sparse=False).double()
    gen = torch.Generator().manual_seed(seeded(1))
    size = input_size(arch)
    x = torch.rand(batch, 3, size, size, generator=gen, dtype=torch.float64)
    out_weight = torch.randn(batch, CLASSES, generator=gen, dtype=torch.float64)
    if scenario == "router_idle_expert":
        bias_against(sparse, loser=1)
    if scenario == "router_mixed":
        spread_router(sparse, x)
    dense.load_state_dict(sparse.state_dict())
    n_layers = len(moe_convs(sparse))
    expert = None
    if scenario == "forced_idle_expert":
        fixed = forced_experts(n_expert, batch)
        expert = fixed if routing == "global" else [fixed.roll(i) for i in range(n_layers)]

    out_s, gx_s, grads_s, info_s = forward_backward(sparse, x, expert, out_weight)
    out_d, gx_d, grads_d, info_d = forward_backward(dense, x, expert, out_weight)

    if routing == "global":
        assert torch.equal(info_s.expert, info_d.expert)
        per_layer = [info_s.expert]
    else:
        assert len(info_s.expert) == n_layers
        assert all(torch.equal(a, b) for a, b in zip(info_s.expert, info_d.expert))
        per_layer = info_s.expert
    if scenario.endswith("idle_expert") and n_expert > 1:  # the batch really leaves expert 1 idle
        assert all((e != 1).all() for e in per_layer)
    if scenario == "router_mixed":  # the router really split the batch among all experts
        assert per_layer[0][:n_expert].tolist() == list(range(n_expert))

    assert rel_err(out_s, out_d) < 1e-5
    assert rel_err(gx_s, gx_d) < 1e-5
    assert grads_s.keys() == grads_d.keys()
    for name in grads_s:
        gs, gd = grads_s[name], grads_d[name]
        assert (gs is None) == (gd is None), name
        if gs is not None:
            assert rel_err(gs, gd) < 1e-5, f"{name}: {rel_err(gs, gd):.2e}"
    if expert is None and n_expert > 1:  # the router took part, so its gradients were compared
        router_grads = [grads_s[n] for n in router_param_names(sparse)]
        assert router_grads and all(g is not None for g in router_grads)


def router_param_names(model):
    ids = {id(p) for p in model.router_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_hard_top1_gate_is_one_and_its_gradient_is_the_softmax_jacobian_row():
    """Forward: the argmax expert and a gate of exactly 1. Backward: d gate_b / d logits_b is the row of the
    softmax Jacobian of the chosen expert k, p_k (onehot_k - p), not a raw pass-through (onehot_k)."""
    g = torch.Generator().manual_seed(seeded(0))
    logits = (3 * torch.randn(6, 4, generator=g)).requires_grad_(True)
    expert, gate = hard_top1(logits)
    assert torch.equal(expert, logits.argmax(1))
    assert torch.equal(gate, torch.ones(6))
    weight = torch.randn(6, generator=g)  # an upstream gradient per image
    grad, = torch.autograd.grad((gate * weight).sum(), logits)
    p = F.softmax(logits.detach(), dim=1)
    p_k = p.gather(1, expert[:, None])  # (B, 1)
    want = weight[:, None] * p_k * (F.one_hot(expert, 4) - p)
    assert torch.allclose(grad, want, atol=1e-6)
    assert hard_top1(logits.detach())[1] is None  # nothing to differentiate: no gate


@pytest.mark.parametrize("routing", ["global", "layer"])
@pytest.mark.parametrize("n_expert", [2, 4])
@pytest.mark.parametrize("arch", representatives())
def test_straight_through_gradient_reaches_router(arch, n_expert, routing):
    model = build(arch, n_expert, routing)
    size = input_size(arch)
    x, y = torch.rand(4, 3, size, size), torch.arange(4) % CLASSES
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    names = router_param_names(model)
    assert names
    for name in names:
        assert params[name].grad is not None and torch.isfinite(params[name].grad).all(), name
    fc_weights = [model.router.fc.weight] if routing == "global" else [r.fc.weight for r in layer_routers(model)]
    for w in fc_weights:
        assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["global", "layer"])
def test_fixed_experts_give_router_no_gradient(routing):
    arch = "resnet18_cifar_moe"
    model = build(arch, 2, routing)
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4) % CLASSES
    fixed = torch.tensor([0, 1, 1, 0])
    expert = fixed if routing == "global" else [fixed] * len(moe_convs(model))
    F.cross_entropy(model(x, expert=expert), y).backward()
    for p in model.router_parameters():
        assert p.grad is None or not p.grad.any()
    assert any(p.grad is not None and p.grad.any() for p in model.backbone_parameters())


# ---- (c) the reference weight layout, by hand ------------------------------------------------------

@pytest.mark.parametrize("sparse", [True, False])
def test_moe_conv_expert_rows_by_hand(sparse):
    """1x1 conv, 1 input channel, 2 output channels per expert, 2 experts: weight rows (2, 3 | 5, 7),
    so expert 0 maps x to (2x, 3x) and expert 1 to (5x, 7x)."""
    conv = MoEConv2d(1, 2, 1, n_expert=2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, 3.0, 5.0, 7.0]).view(4, 1, 1, 1))
    x = torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    y = conv(x, Routing(2, sparse, torch.tensor([1, 0, 1])))
    expected = torch.tensor([[5.0, 7.0], [20.0, 30.0], [500.0, 700.0]]).view(3, 2, 1, 1).expand(3, 2, 2, 2)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, False), (2, 1, True), (1, 0, True)])
def test_moe_conv_matches_conv_on_expert_rows(sparse, stride, padding, bias):
    torch.manual_seed(seeded(0))
    n_expert, w, c_in = 3, 4, 5
    conv = MoEConv2d(c_in, w, 3, stride, padding, bias, n_expert=n_expert).double()
    weight = torch.randn(n_expert * w, c_in, 3, 3, dtype=torch.float64)
    b = torch.randn(n_expert * w, dtype=torch.float64) if bias else None
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias:
            conv.bias.copy_(b)
    x = torch.randn(6, c_in, 7, 7, dtype=torch.float64)
    expert = torch.tensor([2, 0, 2, 1, 0, 2])
    y = conv(x, Routing(n_expert, sparse, expert))
    assert y.shape[1] == w
    for i, e in enumerate(expert.tolist()):
        rows = slice(e * w, (e + 1) * w)
        ref = F.conv2d(x[i:i + 1], weight[rows], None if b is None else b[rows], stride, padding)
        torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-12, atol=1e-12)


def _reference_state(model, seed=0):
    """Random tensors under the model's reference-layout keys (BN variances positive)."""
    gen = torch.Generator().manual_seed(seeded(seed))
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(t.shape, generator=gen) + 0.5
        else:
            state[name] = torch.randn(t.shape, generator=gen) * 0.5
    return state


@pytest.mark.parametrize("forced", [False, True])
def test_first_moe_conv_of_loaded_model_by_hand(forced):
    """resnet18_cifar_moe r=0.125 N=2: the first MoE conv (layer1.0.conv1) computes, for each image,
    conv(stem(x), rows e*8..e*8+7 of the checkpoint's weight), stem = ReLU(BN(conv1(x))) at 64 channels."""
    model = build("resnet18_cifar_moe", 2)
    state = _reference_state(model)
    model.load_state_dict(state, strict=True)
    model.eval()
    first = moe_convs(model)[0]
    assert first is model.layer1[0].conv1
    seen = {}

    def hook(module, args, output):
        seen["input"], seen["expert"], seen["output"] = args[0], args[1].expert, output

    handle = first.register_forward_hook(hook)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seeded(3)))
    expert = torch.tensor([1, 0, 1, 0]) if forced else None
    with torch.no_grad():
        _, info = model(x, expert=expert, return_routing=True)
    handle.remove()
    chosen = info.expert

    stem = F.conv2d(x, state["conv1.weight"], padding=1)
    stem = F.batch_norm(stem, state["bn1.running_mean"], state["bn1.running_var"], state["bn1.weight"],
                        state["bn1.bias"], training=False, eps=1e-5)
    stem = F.relu(stem)  # (4, 64, 32, 32): the CIFAR MoE stem is not scaled
    w = int(RATIO * 64)
    weight = state["layer1.0.conv1.weight"]
    assert weight.shape == (2 * w, 64, 3, 3)
    expected = [F.conv2d(stem[i:i + 1], weight[e * w:(e + 1) * w], padding=1) for i, e in enumerate(chosen.tolist())]

    # The layer may see the batch in another order (sorted by expert): match rows by their input.
    assert seen["output"].shape == (4, w, 32, 32)
    matched = set()
    for j in range(4):
        hits = [i for i in range(4) if torch.allclose(seen["input"][j], stem[i], rtol=1e-4, atol=1e-5)]
        assert len(hits) == 1
        i = hits[0]
        matched.add(i)
        assert seen["expert"][j].item() == chosen[i].item()
        torch.testing.assert_close(seen["output"][j:j + 1], expected[i], rtol=1e-4, atol=1e-4)
    assert matched == {0, 1, 2, 3}


# ---- (d) parameter partition -----------------------------------------------------------------------

@pytest.mark.parametrize("routing", ["global", "layer"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_and_backbone_parameters_partition(arch, routing):
    with torch.device("meta"):
        model = models.build_model(arch, num_classes=CLASSES, ratio=RATIO, n_expert=2, routing=routing)
    router = [id(p) for p in model.router_parameters()]
    backbone = [id(p) for p in model.backbone_parameters()]
    everything = [id(p) for p in model.parameters()]
    assert router and backbone
    assert len(set(router)) == len(router) and len(set(backbone)) == len(backbone)
    assert not set(router) & set(backbone)
    assert sorted(router + backbone) == sorted(everything)
    if routing == "global":
        assert router == [id(p) for p in model.router.parameters()]
    else:
        assert len(layer_routers(model)) == len(moe_convs(model))


# ---- (e) per-layer routing -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", representatives())
def test_layer_routing_lets_layers_choose_differently(arch):
    model = build(arch, 2, routing="layer").eval()
    layers = moe_convs(model)
    # Layer k always picks expert 1 when k % 3 == 0, else expert 0, whatever the image.
    wanted = [1 if k % 3 == 0 else 0 for k in range(len(layers))]
    with torch.no_grad():
        for layer, e in zip(layers, wanted):
            layer.router.fc.weight.zero_()
            layer.router.fc.bias.copy_(torch.tensor([0.0, 1.0]) if e else torch.tensor([1.0, 0.0]))
    size = input_size(arch)
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        out, info = model(x, return_routing=True)
    assert len(info.expert) == len(layers) and len(info.logits) == len(layers)
    assert all(e.shape == (3,) for e in info.expert)
    assert all(lg.shape == (3, 2) for lg in info.logits)
    # One entry per MoE layer, in the layers' registration order; the same image meets different experts.
    assert [e.tolist() for e in info.expert] == [[w] * 3 for w in wanted]

    with torch.no_grad():
        replay = model(x, expert=info.expert)
        all_zero = model(x, expert=[torch.zeros(3, dtype=torch.long)] * len(layers))
    torch.testing.assert_close(replay, out)  # the recorded per-layer choices are the ones used
    assert not torch.allclose(all_zero, out)  # and they matter


def test_global_routing_info_single_entry():
    model = build("resnet18_cifar_moe", 4)
    x = torch.rand(5, 3, 32, 32)
    out, info = model(x, return_routing=True)
    assert info.logits.shape == (5, 4) and info.expert.shape == (5,)
    torch.testing.assert_close(info.expert, info.logits.argmax(1))


def test_sparse_moe_conv_of_a_sorted_batch_equals_one_conv_per_slice_with_its_gradients():
    """The sparse path of a batch sorted by expert (global routing) splits it into the expert groups: its output and
    its gradients w.r.t. the input and the weight equal, bit for bit, the old transcription (each group a slice of
    the batch through its expert's rows, outputs concatenated)."""
    torch.manual_seed(seeded(0))
    n_expert, w, c_in = 3, 4, 5
    conv = MoEConv2d(c_in, w, 3, 1, 1, n_expert=n_expert)
    groups = [(0, 2, 0), (2, 7, 2), (7, 8, 1)]  # sorted batch: 2 images of expert 0, 5 of expert 2, 1 of expert 1
    expert = torch.tensor([0, 0, 2, 2, 2, 2, 2, 1])
    x = torch.randn(8, c_in, 6, 6, requires_grad=True)
    grad_out = torch.randn(8, w, 6, 6)
    y = conv(x, Routing(n_expert, True, expert, None, groups))
    gx, gw = torch.autograd.grad(y, [x, conv.weight], grad_out)
    x0 = x.detach().clone().requires_grad_(True)
    y0 = torch.cat([F.conv2d(x0[s:t], conv.weight[e * w:(e + 1) * w], None, 1, 1) for s, t, e in groups])
    gx0, gw0 = torch.autograd.grad(y0, [x0, conv.weight], grad_out)
    assert torch.equal(y, y0) and torch.equal(gx, gx0) and torch.equal(gw, gw0)
    one = conv(x[2:7], Routing(n_expert, True, expert[2:7], None, [(0, 5, 2)]))  # one group: its expert's rows
    assert torch.equal(one, F.conv2d(x[2:7], conv.weight[2 * w:3 * w], None, 1, 1))


@pytest.mark.parametrize("sparse", [True, False])
def test_the_straight_through_gate_gives_the_products_values_and_gradients_bit_for_bit(sparse):
    """An MoE conv's output times hard_top1's gate (value 1): the output and the gradients to the input, the
    weights and the router logits are those of `y * gate` computed by hand, exactly."""
    g = torch.Generator().manual_seed(seeded(3))
    layer = MoEConv2d(4, 5, 3, padding=1, n_expert=3)
    x = torch.randn(6, 4, 7, 7, generator=g, requires_grad=True)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    w = torch.randn(6, 5, 7, 7, generator=g)
    expert, gate = hard_top1(logits)
    out = layer(x, Routing(3, sparse, expert, gate))
    grads = torch.autograd.grad((out * w).sum(), [x, layer.weight, logits], retain_graph=True)
    y = layer._sparse(x, expert, None) if sparse else layer._dense_masked(x, expert)
    want = y * gate.view(-1, 1, 1, 1)
    want_grads = torch.autograd.grad((want * w).sum(), [x, layer.weight, logits])
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
