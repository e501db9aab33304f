"""Every registered arch builds, runs forward/backward, and matches the reference's parameter layouts.

Parametrized from `models.list_models()` (a new arch is tested the day it is registered) and from the
listing files in `reference/parameters/` (one `name<TAB>shape` per line, state-dict order).
"""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models import ModelSpec
from models.spec import base_arch, contradiction, dense_arch
from conftest import seeded

# The listings travel with the tests when copied into tests/data; otherwise the shared reference folder.
LISTINGS = next((p for p in (Path(__file__).parent / "data" / "reference_parameters",
                             Path("/work/shared/reference/parameters")) if p.is_dir()), None)
LISTING_FILES = sorted(LISTINGS.glob("*.txt")) if LISTINGS else []
LISTING_NAME = re.compile(r"(?P<arch>.+)_ratio(?P<ratio>[\d.]+)(?:_expert(?P<n>\d+))?_classes(?P<classes>\d+)\.txt")

# The registry names the reference README lists; all of them must exist and work.
REFERENCE_ARCHS = (
    [f"resnet{d}_{s}_{k}" for d in (18, 34, 50, 101, 152) for s in ("cifar", "imagenet") for k in ("ori", "moe")]
    + [f"wrn_{v}_{s}_{k}" for v in ("28_4", "28_10", "34_10") for s in ("cifar", "imagenet") for k in ("ori", "moe")]
    + [f"vgg16{b}_{k}" for b in ("", "_bn") for k in ("ori", "moe")]
    + [f"densenet_{s}_{k}" for s in ("cifar", "imagenet") for k in ("ori", "moe")]
)

RATIO, BATCH, CLASSES = 0.125, 2, 5
STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


def input_size(arch: str) -> int:
    """Pixels per side: 64 for ImageNet/TinyImageNet variants (enough for a /32 net), 32 otherwise."""
    return 64 if "imagenet" in arch else 32


def configs():
    """(arch, n_expert): dense archs once, MoE archs with 1, 2 and 4 experts."""
    out = []
    for arch in models.list_models():
        out += [(arch, n) for n in (1, 2, 4)] if models.is_moe(arch) else [(arch, None)]
    return out


def parse_listing(path: Path):
    """(arch, ratio, n_expert or None, classes, [(name, shape), ...]) of one reference listing."""
    m = LISTING_NAME.fullmatch(path.name)
    assert m, f"unexpected listing file name {path.name}"
    entries = []
    for line in path.read_text().splitlines():
        name, shape = line.split("\t")
        entries.append((name, tuple(int(s) for s in re.findall(r"\d+", shape))))
    n = int(m["n"]) if m["n"] else None
    return m["arch"], float(m["ratio"]), n, int(m["classes"]), entries


def layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_reference_arch_names_registered():
    missing = [a for a in REFERENCE_ARCHS if a not in models.list_models()]
    assert not missing, f"not registered: {missing}"


def test_listings_present():
    assert len(LISTING_FILES) >= 12, "reference parameter listings not found"


@pytest.mark.parametrize("arch,n_expert", configs())
def test_forward_backward(arch, n_expert):
    torch.manual_seed(seeded(0))
    model = models.build_model(arch, num_classes=CLASSES, ratio=RATIO, n_expert=n_expert)
    x = torch.rand(BATCH, 3, input_size(arch), input_size(arch))
    y = torch.arange(BATCH) % CLASSES

    model.train()
    out = model(x)
    assert out.shape == (BATCH, CLASSES)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    # The reference MoE WRN's projecting blocks read their raw input: their bn1 is in the layout, unused.
    unused = {f"{name}.bn1.{p}" for name, m in model.named_modules() if getattr(m, "raw_input", False)
              for p in ("weight", "bias")}
    assert bool(unused) == (arch.startswith("wrn") and arch.endswith("_moe"))
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert not no_grad, f"parameters the loss never reaches: {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in model.backbone_parameters())

    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (BATCH, CLASSES)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second)  # eval mode is deterministic (running BN statistics)


@pytest.mark.parametrize("arch", ["resnet18_imagenet_ori", "resnet18_imagenet_moe"])
def test_imagenet_resnet_full_resolution(arch):
    n = 2 if models.is_moe(arch) else None
    model = models.build_model(arch, num_classes=CLASSES, ratio=RATIO, n_expert=n).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("path", LISTING_FILES, ids=lambda p: p.stem)
def test_layout_matches_reference(path):
    arch, ratio, n_expert, classes, entries = parse_listing(path)
    assert arch in models.list_models(), f"{arch} is not registered"
    model = models.build_model(arch, num_classes=classes, ratio=ratio, n_expert=n_expert)
    ours = layout(model)
    assert [k for k, _ in ours] == [k for k, _ in entries], "parameter names or order differ"
    assert ours == entries, [(a, b) for a, b in zip(ours, entries) if a != b][:5]

    # A checkpoint in the reference layout loads strictly, each tensor landing under its own name.
    state = {}
    for i, (name, shape) in enumerate(entries):
        dtype = torch.long if name.endswith("num_batches_tracked") else torch.float32
        state[name] = torch.full(shape, i, dtype=dtype)
    model.load_state_dict(state, strict=True)
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        assert (tensor == i).all(), name


# Layouts of unlisted configurations, derived by hand from the rules in models/resnet.py and models/wrn.py.
DERIVED = [
    # Bottleneck CIFAR MoE: stem 64, inner width int(64 r), output 4x; MoE convs, dense shortcut.
    ("resnet50_cifar_moe", 0.5, 2, {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.conv1.weight": (2 * 32, 64, 1, 1),
        "layer1.0.conv2.weight": (2 * 32, 32, 3, 3),
        "layer1.0.conv3.weight": (2 * 128, 32, 1, 1),
        "layer1.0.bn3.weight": (128,),
        "layer1.0.shortcut.0.weight": (128, 64, 1, 1),
        "layer2.0.shortcut.0.weight": (256, 128, 1, 1),
        "layer4.2.conv3.weight": (2 * 1024, 256, 1, 1),
        "linear.weight": (10, 1024),
    }),
    # Bottleneck ImageNet MoE: scaled 7x7 stem, MoE downsample also in layer1 (width 32 -> 128).
    ("resnet50_imagenet_moe", 0.5, 2, {
        "conv1.weight": (32, 3, 7, 7),
        "layer1.0.downsample.0.weight": (2 * 128, 32, 1, 1),
        "layer1.1.conv1.weight": (2 * 32, 128, 1, 1),
        "layer3.5.conv3.weight": (2 * 512, 128, 1, 1),
        "fc.weight": (10, 1024),
    }),
    ("resnet34_cifar_ori", 0.5, None, {
        "conv1.weight": (32, 3, 3, 3),
        "layer3.5.conv2.weight": (128, 128, 3, 3),
        "linear.weight": (10, 256),
    }),
    ("resnet152_imagenet_ori", 1.0, None, {
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.7.conv3.weight": (512, 128, 1, 1),
        "layer3.35.bn3.weight": (1024,),
        "fc.weight": (10, 2048),
    }),
    # WRN-34-10: five blocks per stage; WRN-28-4: widths 64/128/256.
    ("wrn_34_10_cifar_moe", 0.5, 4, {
        "conv1.weight": (8, 3, 3, 3),
        "block1.layer.4.conv2.weight": (4 * 80, 80, 3, 3),
        "block3.layer.0.convShortcut.weight": (4 * 320, 160, 1, 1),
        "fc.weight": (10, 320),
    }),
    ("wrn_28_4_imagenet_ori", 1.0, None, {
        "conv1.weight": (16, 3, 7, 7),
        "bn0.weight": (16,),
        "block1.layer.0.convShortcut.weight": (64, 16, 1, 1),
        "block3.layer.3.conv2.weight": (256, 256, 3, 3),
        "fc.weight": (10, 256),
    }),
]


@pytest.mark.parametrize("arch,ratio,n_expert,expected", DERIVED, ids=[d[0] for d in DERIVED])
def test_derived_layouts(arch, ratio, n_expert, expected):
    with torch.device("meta"):
        shapes = dict(layout(models.build_model(arch, num_classes=10, ratio=ratio, n_expert=n_expert)))
    for name, shape in expected.items():
        assert shapes.get(name) == shape, f"{name}: {shapes.get(name)} != {shape}"


def test_derived_block_counts():
    with torch.device("meta"):
        wrn34 = models.build_model("wrn_34_10_cifar_ori", ratio=RATIO)
        r101 = models.build_model("resnet101_imagenet_ori", ratio=RATIO)
    assert len(wrn34.block2.layer) == 5
    assert [len(s) for s in (r101.layer1, r101.layer2, r101.layer3, r101.layer4)] == [3, 4, 23, 3]


@pytest.mark.parametrize("arch", models.list_models())
def test_normalize_adds_no_state_keys(arch):
    n = 2 if models.is_moe(arch) else None
    with torch.device("meta"):
        plain = models.build_model(arch, ratio=RATIO, n_expert=n)
        normed = models.build_model(arch, ratio=RATIO, n_expert=n, normalize=STATS)
    assert list(plain.state_dict()) == list(normed.state_dict())


def _one_per_family(kind):
    """The smallest-named (so usually the shallowest) arch of each family: resnet18, wrn_28_4, ..."""
    best = {}
    for arch in [a for a in models.list_models() if models.is_moe(a) == (kind == "moe")]:
        family = re.match(r"[a-z]+", arch).group(0)
        best[family] = min(best.get(family, arch), arch, key=lambda a: (len(a), a))
    return sorted(best.values())


@pytest.mark.parametrize("arch", _one_per_family("ori") + _one_per_family("moe"))
def test_normalize_is_applied_inside(arch):
    """A model with --normalize on [0,1] images equals the same weights without it on normalised images."""
    torch.manual_seed(seeded(0))
    n = 2 if models.is_moe(arch) else None
    plain = models.build_model(arch, ratio=RATIO, n_expert=n).eval()
    normed = models.build_model(arch, ratio=RATIO, n_expert=n, normalize=STATS).eval()
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(BATCH, 3, input_size(arch), input_size(arch))
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in STATS)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - mean) / std))
        assert not torch.allclose(normed(x), plain(x))


@pytest.mark.parametrize("spec, message", [
    (ModelSpec("resnet18_cifar_orx"), "unknown arch 'resnet18_cifar_orx'"),
    (ModelSpec("resnet18_cifar_ori", ratio=0.0), r"--ratio must be in \(0, 1\], got 0.0"),
    (ModelSpec("resnet18_cifar_ori", n_expert=2), r"--n-expert applies to MoE archs \(\*_moe\) only"),
    (ModelSpec("resnet18_cifar_ori", n_expert=1), "--n-expert applies to MoE archs"),
    (ModelSpec("resnet18_cifar_ori", moe_stages=(4,)), "--moe-stages applies to MoE archs"),
    (ModelSpec("resnet18_cifar_ori", top_k=2), "--top-k applies to MoE archs"),
    (ModelSpec("wrn_28_4_cifar_moe"), "--n-expert is required for the MoE arch wrn_28_4_cifar_moe"),
    (ModelSpec("wrn_28_4_cifar_moe", n_expert=0), "--n-expert must be >= 1, got 0"),
    (ModelSpec("wrn_28_4_cifar_moe", n_expert=2, top_k=3), r"--top-k must be in 1..2 \(--n-expert\), got 3"),
    (ModelSpec("wrn_28_4_cifar_moe", n_expert=2, routing="local"), "--routing must be 'global' or 'layer'"),
    (ModelSpec("wrn_28_4_cifar_moe", n_expert=2, moe_stages=()), "--moe-stages must name at least one stage"),
])
def test_the_spec_is_checked_in_one_place(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.validate()
    with pytest.raises(ValueError, match=message):
        models.build_model(spec)


def test_the_spec_built_into_a_model_and_recorded_as_the_reference_keys():
    spec = ModelSpec("resnet18_cifar_moe", ratio=RATIO, num_classes=CLASSES, n_expert=2, moe_stages=[4, 3, 4],
                     normalize=STATS)
    model = models.build_model(spec)
    assert model.spec == spec.validate() and model.spec.moe_stages == (3, 4)
    assert (model.n_expert, model.routing_mode, model.moe_stages, model.top_k) == (2, "global", (3, 4), 1)
    assert model.spec.record() == {"arch": "resnet18_cifar_moe", "ratio": RATIO, "n_expert": 2,
                                   "num_classes": CLASSES, "normalize": True, "routing": "global",
                                   "moe_stages": [3, 4], "top_k": 1}
    dense = models.build_model("resnet18_cifar_ori", ratio=RATIO)
    assert dense.spec.record()["routing"] is None and dense.spec.compared()["top_k"] is None
    assert models.build_model(spec, sparse=False).sparse is False


def test_a_checkpoint_record_is_compared_field_by_field_and_unknowns_are_skipped():
    wanted = ModelSpec("resnet18_cifar_moe", ratio=0.5, n_expert=2).validate().compared()
    assert contradiction({"arch": "resnet18_cifar_moe"}, wanted) is None  # the released code records the arch only
    assert contradiction({"ratio": 0.5 + 1e-12, "n_expert": 2, "top_k": 1}, wanted) is None
    assert contradiction({"ratio": 0.25, "n_expert": 3}, wanted) == ("--ratio", 0.25, 0.5)
    assert contradiction({"n_expert": 3, "routing": "layer"}, wanted) == ("--n-expert", 3, 2)
    # a recorded list against a model with every stage, and a recorded None (every stage) against a list: both differ
    assert contradiction({"moe_stages": [4]}, wanted) == ("--moe-stages", [4], None)
    staged = ModelSpec("resnet18_cifar_moe", ratio=0.5, n_expert=2, moe_stages=(4,)).validate().compared()
    assert contradiction({"moe_stages": None}, staged) == ("--moe-stages", None, [4])
    assert contradiction({}, staged) is None  # not recorded (the released code): not compared


def test_the_flags_a_user_gave_are_compared_with_a_checkpoint_as_a_spec_is():
    """auto_attack_eval.py compares its flags (None: not given) with the record, --normalize and --dataset too."""
    record = {"arch": "resnet18_cifar_moe", "ratio": 0.5, "n_expert": 2, "normalize": True, "dataset": "Digits",
              "moe_stages": [4]}
    flags = {"arch": "resnet18_cifar_moe", "ratio": None, "n_expert": 2, "normalize": False, "dataset": "CIFAR100"}
    assert contradiction(record, flags) == ("--normalize", True, False)
    assert contradiction({**record, "normalize": False}, flags) == ("--dataset", "Digits", "CIFAR100")
    assert contradiction({**record, "normalize": False, "dataset": "CIFAR100"}, flags) is None  # no --moe-stages
    # a training run's spec does not hold them: it builds its model from its own flags
    assert contradiction(record, ModelSpec("resnet18_cifar_moe", ratio=0.5, n_expert=2,
                                           moe_stages=(4,)).validate().compared()) is None


def test_moe_and_dense_names():
    assert models.is_moe("vgg16_bn_moe") and not models.is_moe("vgg16_bn_ori")
    assert base_arch("wrn_28_10_cifar_moe") == base_arch("wrn_28_10_cifar_ori") == "wrn_28_10_cifar"
    assert dense_arch("densenet_cifar_moe") == dense_arch("densenet_cifar_ori") == "densenet_cifar_ori"


def test_is_moe_answers_for_names_and_models_alike():
    """One answer to "is this an MoE": a registry name, a built model, or any other module (a plain network,
    a wrapper that hides the model) asked through `models.is_moe`."""
    assert models.is_moe(models.build_model("vgg16_bn_moe", ratio=0.125, n_expert=2))
    assert not models.is_moe(models.build_model("vgg16_bn_ori", ratio=0.125))
    assert not models.is_moe(torch.nn.Linear(2, 2)) and not models.is_moe(None)


def test_every_variant_registers_once_under_both_names():
    from models import registry
    names = models.list_models()
    bases = sorted({base_arch(a) for a in names})
    assert names == sorted(n for b in bases for n in (f"{b}_ori", f"{b}_moe"))
    assert all(registry._BUILDERS[f"{b}_ori"] is registry._BUILDERS[f"{b}_moe"] for b in bases)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_variant("vgg16_bn", registry._BUILDERS["vgg16_bn_ori"])


@pytest.mark.parametrize("spec", [
    ModelSpec("resnet18_cifar_ori", ratio=0.5, num_classes=100),
    ModelSpec("resnet18_cifar_moe", ratio=0.25, n_expert=4, routing="layer", sparse=False, moe_stages=(4, 3),
              top_k=2, normalize=((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))),
    ModelSpec("vgg16_bn_moe", ratio=0.125, num_classes=200, n_expert=2),
], ids=["dense", "moe-every-field", "vgg-moe"])
def test_from_record_is_the_inverse_of_record(spec):
    """The one way back from a checkpoint's record: `from_record(record())` is the spec (validated: stages sorted),
    given what a record cannot hold (the dataset's mean and std, sparse), and its record is the same record."""
    spec = spec.validate()
    back = ModelSpec.from_record(spec.record(), normalize=spec.normalize, sparse=spec.sparse)
    assert back == spec and back.record() == spec.record()
    assert ModelSpec.from_record({**spec.record(), "normalize": False}).normalize is None
    with pytest.raises(ValueError, match="--ratio"):
        ModelSpec.from_record({**spec.record(), "ratio": None})
