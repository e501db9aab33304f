"""What a model is, as one value: `ModelSpec` (arch, width ratio, classes, experts, routing, placement, top-k,
input normalisation). Built from the flags once (`utils.run.model_spec`), validated here (`ModelSpec.validate`),
the one argument of every family's builder (`models.build_model`), recorded in every checkpoint
(`ModelSpec.record`, the reference's flat keys), rebuilt from a checkpoint's record (`ModelSpec.from_record`, its
inverse) and compared with a checkpoint's record here (`contradiction`).

Also the one answer to "is this arch, or this model, an MoE?" (`is_moe`): the registry's naming convention, `*_ori`
dense and `*_moe` Mixture-of-Experts.
"""
from dataclasses import dataclass, replace

ROUTINGS = ("global", "layer")
# Checkpoint keys compared with the model being loaded, in the order they are checked, with the flag that sets each.
COMPARED = {"arch": "--arch", "ratio": "--ratio", "n_expert": "--n-expert", "routing": "--routing",
            "moe_stages": "--moe-stages", "top_k": "--top-k"}
# Also recorded, and compared when `wanted` holds them: auto_attack_eval.py takes them from the checkpoint unless
# a flag gives them (a training run builds its model from its own flags and `ModelSpec.compared` omits them).
RECORDED_FLAGS = {**COMPARED, "normalize": "--normalize", "dataset": "--dataset"}


def is_moe(arch_or_model) -> bool:
    """True for a Mixture-of-Experts arch name (`*_moe`) or model (a `RoutedNet` of such an arch); False for a
    dense one (`*_ori`) and for any other module (a test's plain network, a wrapper that hides the model)."""
    if isinstance(arch_or_model, str):
        return arch_or_model.endswith("_moe")
    return bool(getattr(arch_or_model, "is_moe", False))


def base_arch(arch: str) -> str:
    """The arch without its `_ori` / `_moe` suffix (`resnet18_cifar_moe` -> `resnet18_cifar`)."""
    for suffix in ("_ori", "_moe"):
        if arch.endswith(suffix):
            return arch[:-len(suffix)]
    return arch


def dense_arch(arch: str) -> str:
    """The dense counterpart of `arch` (itself when dense)."""
    return base_arch(arch) + "_ori" if is_moe(arch) else arch


@dataclass(frozen=True)
class ModelSpec:
    """A model, as the families' builders take it.

    arch: registry name. ratio: width ratio in (0, 1]; every (expert) width is int(ratio * width).
    num_classes: classifier outputs. n_expert: experts per MoE layer (None for a dense arch).
    routing: 'global' (one router, the reference's) or 'layer' (a router per MoE layer).
    sparse: MoE layers compute only each image's own expert (True) or every expert, masked (False): the same
        function, so a checkpoint does not record it.
    moe_stages: stages (1-based: ResNet 1-4, WRN 1-3, VGG blocks 1-5, DenseNet dense blocks) that hold MoE convs,
        the others dense at the same width ratio; None: every stage (the reference's layout).
    top_k: experts per image in every MoE layer (1: the reference's hard top-1 routing).
    normalize: (mean, std) per RGB channel applied inside the model to [0,1] inputs, or None.
    """
    arch: str
    ratio: float = 1.0
    num_classes: int = 10
    n_expert: int | None = None
    routing: str = "global"
    sparse: bool = True
    moe_stages: tuple | None = None
    top_k: int = 1
    normalize: tuple | None = None

    @property
    def is_moe(self) -> bool:
        return is_moe(self.arch)

    def validate(self) -> "ModelSpec":
        """This spec with `moe_stages` as a sorted tuple, or a ValueError naming the flag that is wrong (the one
        place where the model's settings are checked against each other)."""
        from .registry import list_models  # the registry imports the families, which import this module
        if self.arch not in list_models():
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(list_models())}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.is_moe:
            if self.n_expert is None:
                raise ValueError(f"--n-expert is required for the MoE arch {self.arch}")
            if self.n_expert < 1:
                raise ValueError(f"--n-expert must be >= 1, got {self.n_expert}")
            if not 1 <= self.top_k <= self.n_expert:
                raise ValueError(f"--top-k must be in 1..{self.n_expert} (--n-expert), got {self.top_k}")
        else:
            for flag, unset in (("n_expert", self.n_expert is None), ("moe_stages", self.moe_stages is None),
                                ("top_k", self.top_k == 1)):
                if not unset:
                    raise ValueError(f"--{flag.replace('_', '-')} applies to MoE archs (*_moe) only; "
                                     f"{self.arch} is dense")
        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing must be 'global' or 'layer', got {self.routing!r}")
        if self.moe_stages is None:
            return self
        if not self.moe_stages:
            raise ValueError("--moe-stages must name at least one stage")
        return replace(self, moe_stages=tuple(sorted(set(self.moe_stages))))

    def record(self) -> dict:
        """The spec as a checkpoint records it, under the reference's flat keys (`normalize` as a bool, the
        routing of a dense model as None)."""
        return {"arch": self.arch, "ratio": self.ratio, "n_expert": self.n_expert, "num_classes": self.num_classes,
                "normalize": self.normalize is not None, "routing": self.routing if self.is_moe else None,
                "moe_stages": None if self.moe_stages is None else list(self.moe_stages), "top_k": self.top_k}

    @classmethod
    def from_record(cls, record: dict, *, normalize: tuple | None = None, sparse: bool = True) -> "ModelSpec":
        """The inverse of `record()`: the validated spec a checkpoint's record describes (ValueError naming the
        flag when the record is incomplete or inconsistent). A record keeps only whether the model normalises:
        `normalize` is the dataset's (mean, std), used when it does; `sparse` is not recorded (the same function
        either way). A dense model's routing is 'global'."""
        for key, flag in (("arch", "--arch"), ("ratio", "--ratio"), ("num_classes", "the number of classes")):
            if record.get(key) is None:
                raise ValueError(f"{flag} is required: the checkpoint does not record it")
        stages, n_expert = record.get("moe_stages"), record.get("n_expert")
        return cls(str(record["arch"]), ratio=float(record["ratio"]), num_classes=int(record["num_classes"]),
                   n_expert=None if n_expert is None else int(n_expert), routing=record.get("routing") or "global",
                   sparse=sparse, moe_stages=None if stages is None else tuple(stages),
                   top_k=int(record.get("top_k") or 1), normalize=normalize if record.get("normalize") else None
                   ).validate()

    def compared(self) -> dict:
        """The fields a checkpoint's record must agree with to load into this model (None: not compared)."""
        record = {**self.record(), "ratio": float(self.ratio)}
        if not self.is_moe:
            record["top_k"] = None
        return {key: record[key] for key in COMPARED}


def contradiction(record: dict, wanted: dict):
    """The first `(flag, recorded, wanted)` where a checkpoint's `record` and `wanted` (`ModelSpec.compared()`, or
    the flags of `RECORDED_FLAGS` a user gave, None where not given) both hold a value for a key and the values
    differ; None when they agree. Checkpoints of the released code record the arch only: what they do not record
    is not compared."""
    for key, flag in RECORDED_FLAGS.items():
        recorded, value = record.get(key), wanted.get(key)
        if key == "moe_stages" and key in record and key in wanted and is_moe(str(wanted.get("arch") or "")) and \
                (recorded is None) != (value is None):
            return flag, recorded, value  # a recorded None is every stage, not "not recorded"
        if recorded is None or value is None:
            continue
        try:
            same = abs(float(recorded) - value) < 1e-9 if isinstance(value, float) else recorded == value
        except (TypeError, ValueError):
            same = False
        if not same:
            return flag, recorded, value
    return None
