"""VGG-16 and DenseNet, dense and MoE: reference layouts, forward/backward, sparse == dense-masked,
and DenseNet-MoE (our design, absent from the reference) routing each image through its own experts."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision  # layouts to compare with

import models
from models.layers import MoEConv2d
from conftest import forward_backward, moe_convs, seeded, spread_router

RATIO, CLASSES = 0.125, 5
STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
ARCHS = ["vgg16_ori", "vgg16_bn_ori", "vgg16_moe", "vgg16_bn_moe",
         "densenet_cifar_ori", "densenet_imagenet_ori", "densenet_cifar_moe", "densenet_imagenet_moe"]
MOE_ARCHS = [a for a in ARCHS if a.endswith("_moe")]
LISTING_DIRS = (Path(__file__).parent / "data" / "reference_parameters", Path("/work/shared/reference/parameters"))
LISTINGS = [  # (file, arch, ratio, n_expert, classes)
    ("vgg16_bn_ori_ratio0.5_classes10.txt", "vgg16_bn_ori", 0.5, None, 10),
    ("vgg16_bn_ori_ratio1.0_classes10.txt", "vgg16_bn_ori", 1.0, None, 10),
    ("vgg16_bn_moe_ratio0.5_expert2_classes10.txt", "vgg16_bn_moe", 0.5, 2, 10),
    ("densenet_cifar_ori_ratio0.5_classes10.txt", "densenet_cifar_ori", 0.5, None, 10),
]
# torchvision's vgg16 / vgg16_bn module indices of the 13 convs.
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_BN_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]


def input_size(arch):
    return 64 if "imagenet" in arch else 32


def build(arch, n_expert=None, ratio=RATIO, seed=0, **kwargs):
    torch.manual_seed(seeded(seed))
    return models.build_model(arch, num_classes=CLASSES, ratio=ratio, n_expert=n_expert, **kwargs)


def layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def read_listing(name):
    path = next((d / name for d in LISTING_DIRS if (d / name).is_file()), None)
    assert path is not None, f"reference listing {name} not found in {LISTING_DIRS}"
    entries = []
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        entries.append((key, tuple(int(s) for s in re.findall(r"\d+", shape))))
    return entries


def rel_err(a, b):
    """Norm-wise relative difference (0 when both are zero)."""
    scale = max(a.norm().item(), b.norm().item())
    return 0.0 if scale == 0 else (a - b).norm().item() / scale


def conv_indices(model):
    """Indices N of features.N modules that hold a conv (dense or MoE)."""
    return [int(k) for k, m in model.features.named_children() if isinstance(m, (torch.nn.Conv2d, MoEConv2d))]


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("name,arch,ratio,n_expert,classes", LISTINGS, ids=[row[0] for row in LISTINGS])
def test_layout_equals_reference_listing(name, arch, ratio, n_expert, classes):
    expected = read_listing(name)
    with torch.device("meta"):
        ours = layout(models.build_model(arch, num_classes=classes, ratio=ratio, n_expert=n_expert))
    assert [k for k, _ in ours] == [k for k, _ in expected], "names or order differ"
    assert ours == expected, [(a, b) for a, b in zip(ours, expected) if a != b][:5]


@pytest.mark.parametrize("n_expert", [None, 2])
def test_vgg16_without_bn_is_bn_layout_minus_bn(n_expert):
    kind = "moe" if n_expert else "ori"
    with torch.device("meta"):
        plain = build(f"vgg16_{kind}", n_expert, ratio=0.5)
        bn = build(f"vgg16_bn_{kind}", n_expert, ratio=0.5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.features)
    backbone = [k for k in plain.state_dict() if not k.startswith("router.")]  # the router has its own BN
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in backbone)
    assert conv_indices(plain) == VGG16_CONVS
    assert conv_indices(bn) == VGG16_BN_CONVS
    conv_shapes = [tuple(plain.features[i].weight.shape) for i in VGG16_CONVS]
    bn_conv_shapes = [tuple(bn.features[i].weight.shape) for i in VGG16_BN_CONVS]
    assert conv_shapes == bn_conv_shapes
    head = [[(k, s) for k, s in layout(m) if not k.startswith("features.")] for m in (plain, bn)]
    assert head[0] == head[1]


def test_vgg16_module_indices_are_torchvisions():
    with torch.device("meta"):
        tv, tv_bn = torchvision.models.vgg16(), torchvision.models.vgg16_bn()
    tv_idx = [i for i, m in enumerate(tv.features) if isinstance(m, torch.nn.Conv2d)]
    tv_bn_idx = [i for i, m in enumerate(tv_bn.features) if isinstance(m, torch.nn.Conv2d)]
    assert (tv_idx, tv_bn_idx) == (VGG16_CONVS, VGG16_BN_CONVS)


# The released VGG-16: four max-pools, none after the last three convs (reference/README.md).
VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


@pytest.mark.parametrize("arch", ["vgg16_ori", "vgg16_bn_ori", "vgg16_moe", "vgg16_bn_moe"])
def test_vgg16_sequence_is_the_released_one_and_32px_reaches_the_pool_at_2x2(arch):
    """Same weights give the released code's logits only with its layer sequence: a 32x32 image must
    enter the 2x2 adaptive pool as a 2x2 map (a fifth max-pool would make it 1x1, replicated)."""
    model = build(arch, 2 if arch.endswith("_moe") else None, ratio=0.25).eval()
    sequence = []
    for m in model.features:
        if isinstance(m, torch.nn.MaxPool2d):
            sequence.append("M")
        elif isinstance(m, (torch.nn.Conv2d, MoEConv2d)):
            sequence.append(m.out_channels)
    assert sequence == [c if c == "M" else int(0.25 * c) for c in VGG16_CONFIG]
    seen = []
    model.avgpool.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert seen == [(2, 2)]


def test_vgg_moe_first_conv_dense_others_moe():
    with torch.device("meta"):
        model = build("vgg16_bn_moe", 3, ratio=0.5)
    convs = [model.features[i] for i in VGG16_BN_CONVS]
    assert isinstance(convs[0], torch.nn.Conv2d) and convs[0].out_channels == 32
    assert all(isinstance(c, MoEConv2d) and c.n_expert == 3 for c in convs[1:])


def test_densenet_imagenet_at_full_ratio_is_torchvision_densenet121():
    """Our ImageNet DenseNet at r=1 has torchvision's DenseNet-121 layout (its `norm5` is our `norm_final`)."""
    with torch.device("meta"):
        tv = torchvision.models.densenet121(num_classes=CLASSES)
        ours = build("densenet_imagenet_ori", ratio=1.0)
    expected = [(k.replace("features.norm5.", "features.norm_final."), s) for k, s in layout(tv)]
    assert layout(ours) == expected


def test_densenet_moe_layout():
    """r=0.5, N=2: dense layers' convs hold N experts of the dense widths; stem, transitions, head dense."""
    with torch.device("meta"):
        cifar = dict(layout(build("densenet_cifar_moe", 2, ratio=0.5)))
        imnet = dict(layout(build("densenet_imagenet_moe", 2, ratio=0.5)))
    assert cifar["features.conv0.weight"] == (12, 3, 3, 3)
    assert cifar["features.denseblock1.denselayer1.conv1.weight"] == (2 * 24, 12, 1, 1)
    assert cifar["features.denseblock1.denselayer1.norm2.weight"] == (24,)
    assert cifar["features.denseblock1.denselayer1.conv2.weight"] == (2 * 6, 24, 3, 3)
    assert cifar["features.denseblock1.denselayer2.norm1.weight"] == (18,)
    assert cifar["features.transition1.conv.weight"] == (24, 48, 1, 1)
    assert cifar["features.denseblock3.denselayer6.conv1.weight"] == (2 * 24, 60, 1, 1)
    assert cifar["classifier.weight"] == (CLASSES, 66)
    assert cifar["router.fc.weight"] == (2, 64)
    # DenseNet-121 at r=0.5: stem 32, growth 16, bottleneck 64; 32 -> 128|64 -> 256|128 -> 512|256 -> 512.
    assert imnet["features.conv0.weight"] == (32, 3, 7, 7)
    assert imnet["features.norm0.weight"] == (32,)
    assert imnet["features.denseblock1.denselayer1.conv1.weight"] == (2 * 64, 32, 1, 1)
    assert imnet["features.denseblock1.denselayer1.conv2.weight"] == (2 * 16, 64, 3, 3)
    assert imnet["features.transition1.conv.weight"] == (64, 128, 1, 1)
    assert imnet["features.transition3.conv.weight"] == (256, 512, 1, 1)
    assert imnet["features.denseblock4.denselayer16.conv1.weight"] == (2 * 64, 256 + 15 * 16, 1, 1)
    assert imnet["features.norm_final.weight"] == (512,)
    assert imnet["classifier.weight"] == (CLASSES, 512)


def test_densenet_rejects_ratio_without_channels():
    with pytest.raises(ValueError, match="without channels"):
        build("densenet_cifar_ori", ratio=0.05)


# ---------------------------------------------------------------- forward / backward

def configs():
    return [(a, n) for a in ARCHS for n in ((1, 2, 4) if a.endswith("_moe") else (None,))]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch,n_expert", configs())
def test_forward_backward(arch, n_expert, mode):
    model = build(arch, n_expert).train(mode == "train")
    size = input_size(arch)
    x = torch.rand(3, 3, size, size, requires_grad=True)
    y = torch.arange(3) % CLASSES
    out = model(x)
    assert out.shape == (3, CLASSES) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters the loss never reaches: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0
    if model.is_moe and n_expert > 1:  # the router learns through the straight-through gate
        assert any(p.grad.abs().sum() > 0 for p in model.router_parameters())


@pytest.mark.parametrize("arch,size", [("vgg16_bn_ori", 48), ("vgg16_moe", 64), ("densenet_cifar_ori", 40),
                                       ("densenet_imagenet_moe", 96)])
def test_other_input_sizes(arch, size):
    model = build(arch, 2 if arch.endswith("_moe") else None).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_normalize_is_honoured(arch):
    """With --normalize, [0,1] images give what the same weights give on normalised images without it."""
    n = 2 if arch.endswith("_moe") else None
    plain = build(arch, n).eval()
    normed = build(arch, n, normalize=STATS).eval()
    normed.load_state_dict(plain.state_dict())
    size = input_size(arch)
    x = torch.rand(2, 3, size, size)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in STATS)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - mean) / std))
        assert not torch.allclose(normed(x), plain(x))


# ---------------------------------------------------------------- sparse == dense-masked

def forced(n_expert, batch, gen):
    """Unsorted experts with expert 1 idle: N=2 sends everything to expert 0 (expert 1 gets no image)."""
    allowed = torch.tensor([e for e in range(n_expert) if e != 1])
    return allowed[torch.randint(len(allowed), (batch,), generator=gen)]


@pytest.mark.parametrize("scenario", ["router", "forced_idle_expert"])
@pytest.mark.parametrize("routing", ["global", "layer"])
@pytest.mark.parametrize("n_expert", [2, 4])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sparse_equals_dense_masked(arch, n_expert, routing, scenario):
    batch, size = 6, input_size(arch)
    sparse = build(arch, n_expert, routing=routing, sparse=True).double()
    dense = build(arch, n_expert, routing=routing, sparse=False, seed=1).double()
    dense.load_state_dict(sparse.state_dict())
    gen = torch.Generator().manual_seed(seeded(0))
    x = torch.rand(batch, 3, size, size, generator=gen, dtype=torch.float64)
    weight = torch.randn(batch, CLASSES, generator=gen, dtype=torch.float64)
    expert = None
    if scenario == "router":
        spread_router(sparse, x)
        dense.load_state_dict(sparse.state_dict())
    elif routing == "global":
        expert = forced(n_expert, batch, gen)
    else:
        expert = [forced(n_expert, batch, gen) for _ in moe_convs(sparse)]

    out_s, gx_s, grads_s, info_s = forward_backward(sparse, x, expert, weight)
    out_d, gx_d, grads_d, info_d = forward_backward(dense, x, expert, weight)
    chosen_s = info_s.expert if routing == "global" else torch.stack(info_s.expert)
    chosen_d = info_d.expert if routing == "global" else torch.stack(info_d.expert)
    assert torch.equal(chosen_s, chosen_d)
    if scenario == "router":
        first = chosen_s if routing == "global" else chosen_s[0]
        assert set(first[:n_expert].tolist()) == set(range(n_expert)), "the router does not use every expert"
    else:
        assert not (chosen_s == 1).any()
    assert rel_err(out_s, out_d) < 1e-5
    assert rel_err(gx_s, gx_d) < 1e-5
    for name, g in grads_s.items():
        if g is None:
            assert grads_d[name] is None, name
            continue
        assert grads_d[name] is not None, name
        assert rel_err(g, grads_d[name]) < 1e-5, name
    idle = moe_convs(sparse)[1]  # expert 1's weights never ran, so they get an exact zero gradient
    if scenario == "forced_idle_expert":
        assert (idle.weight.grad[idle.out_channels:2 * idle.out_channels] == 0).all()
    else:  # the straight-through gate reaches the router(s), the same way in both computations
        router_grads = [grads_s[n] for n, _ in sparse.named_parameters() if "router" in n]
        assert any(g is not None and g.abs().sum() > 0 for g in router_grads)


# ---------------------------------------------------------------- DenseNet-MoE routes

@pytest.mark.parametrize("arch", ["densenet_cifar_moe", "densenet_imagenet_moe", "vgg16_bn_moe"])
def test_changing_one_images_expert_changes_only_its_output(arch):
    model = build(arch, 3).double().eval()  # float64: untrained eval-mode logits are large
    size = input_size(arch)
    x = torch.rand(4, 3, size, size, dtype=torch.float64)
    expert = torch.tensor([0, 1, 2, 0])
    moved = expert.clone()
    moved[0] = 2
    with torch.no_grad():
        before, after = model(x, expert=expert), model(x, expert=moved)
    assert rel_err(before[0], after[0]) > 1e-3
    torch.testing.assert_close(before[1:], after[1:])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ["densenet_cifar_moe", "densenet_imagenet_moe", "vgg16_moe", "vgg16_bn_moe"])
def test_one_expert_is_the_dense_model_of_that_ratio(arch, mode):
    """All images on expert e: the MoE model computes the dense model (same ratio) holding expert e's weights.

    This pins the design: per-expert widths are the dense widths, later layers see the dense channel count.
    """
    n_expert, e = 3, 2
    moe = build(arch, n_expert).double().train(mode == "train")
    dense = build(arch.replace("_moe", "_ori")).double().train(mode == "train")
    state = dense.state_dict()
    assert [k for k in moe.state_dict() if not k.startswith("router.")] == list(state)
    for name, tensor in moe.state_dict().items():
        if name.startswith("router."):
            continue
        if tensor.shape != state[name].shape:  # an MoE conv: keep expert e's rows
            w = state[name].shape[0]
            assert tensor.shape[0] == n_expert * w, name
            tensor = tensor[e * w:(e + 1) * w]
        state[name] = tensor
    dense.load_state_dict(state)
    size = input_size(arch)
    x = torch.rand(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        ours, reference = moe(x, expert=torch.full((3,), e)), dense(x)
        other = moe(x, expert=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(ours, reference)
    assert rel_err(other, reference) > 1e-3
