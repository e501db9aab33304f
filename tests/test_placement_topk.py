"""--moe-stages (MoE convs in chosen stages only) and --top-k routing (issue 13, items 1 and 2)."""
import os

import pytest
import torch

import models
from args import parse_args
from models.layers import MoEConv2d, top_k_gates
from utils.errors import UsageError
from utils.flops import inference_gflops
from conftest import seeded

REF = os.path.join(os.path.dirname(__file__), "data", "reference_parameters")


def _layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]


def _reference_layout(name):
    with open(os.path.join(REF, name)) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [(k, tuple(int(d) for d in s.strip("()[] ").split(",") if d.strip())) for k, s in rows
            if not k.endswith("num_batches_tracked")]


def test_last_stage_only_layout_is_the_reference_with_dense_convs_before_stage_4():
    # Expected: the reference's MoE listing, where every block conv of layer1-3 has one expert's rows (dense at the
    # same ratio) and layer4 keeps N experts; BatchNorms, shortcuts, stem, classifier and router unchanged.
    expected = []
    for name, shape in _reference_layout("resnet18_cifar_moe_ratio0.5_expert2_classes10.txt"):
        block_conv = name.split(".")[0] in ("layer1", "layer2", "layer3") and ".conv" in name
        expected.append((name, (shape[0] // 2, *shape[1:]) if block_conv else shape))
    model = models.build_model("resnet18_cifar_moe", ratio=0.5, n_expert=2, moe_stages=[4])
    assert _layout(model) == expected
    moe = [n for n, m in model.named_modules() if isinstance(m, MoEConv2d)]
    assert moe == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]


@pytest.mark.parametrize("arch,stages,prefixes", [
    ("vgg16_bn_moe", [5], ["features.34", "features.37", "features.40"]),
    ("wrn_28_4_cifar_moe", [1], ["block1."]),
    ("densenet_cifar_moe", [2], ["features.denseblock2."]),
    ("resnet18_imagenet_moe", [2, 3], ["layer2.", "layer3."]),
])
def test_moe_convs_sit_in_the_chosen_stages_and_the_model_runs(arch, stages, prefixes):
    full = models.build_model(arch, ratio=0.25, n_expert=2)
    model = models.build_model(arch, ratio=0.25, n_expert=2, moe_stages=stages)
    expected = [n for n, m in full.named_modules() if isinstance(m, MoEConv2d) and n.startswith(tuple(prefixes))]
    assert expected and [n for n, m in model.named_modules() if isinstance(m, MoEConv2d)] == expected
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)  # dense and MoE stages fit together


def _stage4_conv_flops(ratio):
    """2 x multiply-adds per image of resnet18_cifar's stage-4 block convs (4x4 output maps)."""
    w, w_in = int(ratio * 512), int(ratio * 256)
    return 2 * 16 * 9 * w * (w_in + 3 * w)


def test_flops_of_a_placement_and_of_top_k():
    ratio, n = 0.5, 3
    sparse = {k: models.build_model("resnet18_cifar_moe", ratio=ratio, n_expert=n, moe_stages=[4], top_k=k)
              for k in (1, 2)}
    masked = models.build_model("resnet18_cifar_moe", ratio=ratio, n_expert=n, moe_stages=[4], sparse=False)
    f1, f2 = (inference_gflops(sparse[k])["backbone"] * 1e9 for k in (1, 2))
    fm = inference_gflops(masked)["backbone"] * 1e9
    stage4 = _stage4_conv_flops(ratio)
    assert fm - f1 == pytest.approx((n - 1) * stage4, rel=1e-6)  # masked runs every expert of stage 4 only
    assert f2 - f1 == pytest.approx(stage4, rel=1e-6)  # each image through 2 experts in stage 4's convs


def test_placement_errors():
    with pytest.raises(ValueError, match="stages 1..4"):
        models.build_model("resnet18_cifar_moe", ratio=0.5, n_expert=2, moe_stages=[5])
    with pytest.raises(ValueError, match=r"MoE archs \(\*_moe\) only"):
        models.build_model("resnet18_cifar_ori", ratio=0.5, moe_stages=[4])
    for argv in (["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--top-k", "3"],
                 ["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--top-k", "0"],
                 ["--arch", "resnet18_cifar_ori", "--moe-stages", "4"],
                 ["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--per-expert"]):
        with pytest.raises(UsageError):
            parse_args(argv)


def test_top_k_gates_are_the_renormalised_router_probabilities():
    logits = torch.randn(6, 4, dtype=torch.float64)
    expert, gate = top_k_gates(logits, 2)
    p = logits.softmax(1).gather(1, expert)
    torch.testing.assert_close(gate, p / p.sum(1, keepdim=True))
    assert torch.equal(expert, logits.topk(2, dim=1).indices)


@pytest.mark.parametrize("routing", ["global", "layer"])
def test_top_2_sparse_equals_dense_masked_in_float64(routing):
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=3, top_k=2, routing=routing,
                               moe_stages=[3, 4]).double().eval()
    x = torch.rand(7, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    results = []
    for sparse in (True, False):
        model.sparse = sparse
        model.zero_grad(set_to_none=True)
        x.grad = None
        out, info = model(x, return_routing=True)
        out.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad.clone(), grads, info))
    (o1, gx1, g1, info), (o2, gx2, g2, _) = results
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-12)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-12, msg=k)
    router = [k for k in g1 if "router" in k]
    assert router and any(g1[k].abs().sum() > 0 for k in router)  # the gates carry the router's gradient
    experts = info.expert if routing == "global" else info.expert[0]
    assert experts.shape == (7, 2)
