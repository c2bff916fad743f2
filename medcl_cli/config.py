"""Every default medcl has, in frozen dataclasses; YAML files and `--set key=value` override them.

Precedence: dataclass defaults < `--config FILE` (repeatable, later wins) < `--set a.b=c` < explicit CLI
flags. The YAML templates in `templates/` are commented copies of these defaults; a test keeps them equal.
An unknown key anywhere gets a "did you mean" error (exit 2).

One piece past 300 lines on purpose: it is the one home of every default (design rule 6), so a reader
finds any default, its type and its comment in one file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from medcl_cli.errors import UsageError, did_you_mean

# --------------------------------------------------------------------------------------------------
# ingest


@dataclass(frozen=True)
class IngestConfig:
    """How `medcl ingest` turns DICOM/NIfTI folders into a dataset folder."""

    val_fraction: float = 0.2  # fraction of patients in `val` when no --split-file is given
    test_fraction: float = 0.0  # fraction of patients in `test`
    seed: int = 0  # seed of the patient-level split
    gap_factor: float = 1.5  # a slice step above gap_factor x median step is a gap (missing slices)
    spacing_tolerance: float = 0.01  # relative step variation tolerated before "variable spacing"
    keep_localizers: bool = False  # keep LOCALIZER / one-slice series
    resample_tilt: bool = True  # resample gantry-tilted series onto an orthogonal grid
    workers: int = 0  # header-reading processes; 0 = one per core


# --------------------------------------------------------------------------------------------------
# data, augmentation, model


@dataclass(frozen=True)
class DataConfig:
    """How slices are cut from the volumes and preprocessed (cached once per dataset + this config)."""

    image_size: int = 128  # slices are resized to image_size x image_size (labels nearest)
    resize: str = "resize"  # resize | pad_crop
    normalize: str = "zscore"  # zscore | minmax | percentile (per volume)
    cache: str = "disk"  # disk (memory-mapped, reused by later runs) | ram | none
    num_workers: str = "auto"  # data-loader workers: auto or an integer
    partitions: int = 3  # slice_position buckets exposed as the meta label `slice_part`


@dataclass(frozen=True)
class AugmentConfig:
    """Batched, on-device augmentation; geometric transforms are tracked so views can be aligned."""

    rotate_deg: float = 15.0  # max absolute rotation
    scale: float = 0.15  # scale drawn from [1 - scale, 1 + scale]
    translate: float = 0.1  # max shift as a fraction of the image size
    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.2  # additive shift drawn from [-b, b] (on normalised intensities)
    contrast: float = 0.25  # multiplicative factor drawn from [1 - c, 1 + c]
    gamma: float = 0.3  # gamma drawn from exp(U(-g, g))
    noise: float = 0.05  # std of additive Gaussian noise
    blur_p: float = 0.0  # probability of a Gaussian blur


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net every method shares (returns logits and stage features)."""

    spatial_dims: int = 2
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # ARCO / SSL4MIS widths
    norm: str = "batch"  # batch | instance | group
    dropout: float = 0.0
    uafs_at: tuple[str, ...] = ()  # stage names after which a UAFS block is inserted, e.g. ["dec3"]


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: str = "cosine"  # cosine | poly | constant
    warmup_steps: int = 0
    poly_power: float = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """The fit loop: shared by pretrain and finetune."""

    steps: int = 1000
    batch_size: int = 16  # global batch (split across DDP ranks)
    val_every: int = 250  # validate per 3D volume every N steps (0 = only at the end)
    checkpoint_every: int = 100  # write checkpoints/last.pt every N steps
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    precision: str = "auto"  # auto (bf16/fp16 on CUDA, bf16 on a CPU with native bf16, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    labeled_fraction_per_batch: float = 0.5  # semi-supervised methods: share of labelled slices per batch
    log_every: int = 10


@dataclass(frozen=True)
class InferenceConfig:
    """How `evaluate` and `predict` run the network over a volume (slices of one volume per batch)."""

    batch_size: int = 16  # slices per forward pass; memory ~ batch x classes x Y x X floats after resampling
    nsd_tolerance_mm: float = 1.0  # evaluate: surface distance counted as agreement by NSD (Nikolov et al. 2021)


# --------------------------------------------------------------------------------------------------
# methods (one section per registry key)


@dataclass(frozen=True)
class SupervisedConfig:
    """Dice + cross-entropy on the labelled slices: the baseline."""

    dice_weight: float = 1.0
    ce_weight: float = 1.0


@dataclass(frozen=True)
class SimCLRConfig:
    """Global NT-Xent on two views of each slice (Chen et al. 2020)."""

    temperature: float = 0.5  # NT-Xent temperature (SimCLR paper: 0.5 for batch 256-512; Hu et al. code: 0.5)
    proj_hidden: int = 256  # hidden width of the projection MLP on the pooled bottleneck (SimCLR: 2048 for ResNet-50)
    proj_dim: int = 128  # embedding size the loss sees (SimCLR paper: 128)


@dataclass(frozen=True)
class GCLConfig:
    """Gradient-guided contrastive learning with multi-perspective meta labels (Wu et al. 2023)."""

    # (paper's ACDC examples are patient, cardiac phase, slice position; `group` = diagnosis is a 4th option).
    # `auto`: patient + slice_part always, plus phase or another categorical column of a case where the
    # dataset has one (methods/gcl.py auto_meta_labels); on ACDC that is the paper's patient, phase, slice_part
    meta_labels: tuple[str, ...] = ("auto",)  # meta columns: equal value = positive; `auto` = the dataset's own
    partitions: int = 3  # slice_position buckets of `slice_part` for GCL (Peng et al. 2021 on ACDC: 3)
    temperature: float = 0.07  # image-wise SupCon temperature (paper: unverified; predecessor code: 0.07)
    pixel_temperature: float = 0.07  # pixel-wise SupCon temperature (paper: unverified)
    image_weight: float = 1.0  # weight of each image-wise loss in a meta label's task loss (paper: unverified)
    pixel_weight: float = 1.0  # weight of each pixel-wise loss (paper: unverified)
    proj_hidden: int = 256  # hidden width of the image and pixel heads (predecessor: 256)
    proj_dim: int = 128  # image embedding size (predecessor: 256)
    pixel_dim: int = 64  # pixel embedding size (paper: unverified)
    combiner: str = "pcgrad"  # Gradient Mitigator rule: pcgrad | sum (paper: conflict mitigation, rule unverified)
    surgery_on: str = "features"  # features (cheap: surgery on dL/d bottleneck) | parameters (exact, M backwards)
    surgery_scope: str = "sample"  # features only: PCGrad per sample | over the whole batch
    topk: int = 16  # Gradient Filter: pixels per slice kept for the pixel-wise loss (paper: unverified)
    pixel_positives: str = "position"  # position (same label and base-grid position) | image (same label)


@dataclass(frozen=True)
class PDCRConfig:
    """Patch-dragsaw contrastive regularisation of hidden features on top of Dice + CE (Liu/Li et al. 2022)."""

    enc_stages: tuple[str, ...] = ("enc2", "enc3")  # encoder stages contrasted (paper: encoder layers 2 and 3)
    dec_stages: tuple[str, ...] = ("dec1",)  # decoder stages contrasted (2D code: decoder features too)
    cross_stages: tuple[str, ...] = ("enc2", "enc3")  # cross-layer term between each pair; [] = off
    enc_weight: float = 0.1  # weight of the encoder PDCR term (paper 2D: 0.1)
    dec_weight: float = 0.01  # weight of the decoder PDCR term (paper 2D: 0.01)
    cross_weight: float = 0.01  # weight of the cross-layer term (paper 2D and 3D: 0.01)
    temperature: float = 0.5  # tau (3D code: 0.5; the 2D code's 1.0 goes with its swapped sign)
    patches: str = "hierarchical"  # hierarchical (H-PDCR, patch series) | rf (RF-PDCR, receptive field)
    patch_sizes: tuple[int, ...] = (5, 7, 9)  # H-PDCR patch sides in input pixels (paper: 5, 7, 9)
    combine: str = "per_size"  # per_size (one loss per patch size, paper's best) | average (ratios first)
    enc_samples: int = 64  # grid positions per encoder stage and image (2D code: 64 and 32)
    dec_samples: int = 32  # grid positions per decoder stage and image (2D code: 32 and 8)
    cross_samples: int = 32  # grid positions per stage for the cross-layer term (2D code: 32)
    border: int = 1  # feature pixels skipped at the map edges (grown so that H-PDCR patches fit)
    cross_channels: int = 64  # output width of the 1x1 channel-adjusting convs of the cross-layer term


@dataclass(frozen=True)
class SemiCLConfig:
    """Semi-supervised contrastive pretraining: global NT-Xent, then supervised local contrast (Hu et al. 2021)."""

    stages: tuple[str, ...] = ("global", "local")  # global and/or local, in this order (paper: global, then local)
    global_fraction: float = 0.5  # share of train.steps for the global stage when both run (code: 100 + 60 epochs)
    global_temperature: float = 0.5  # NT-Xent tau of the global stage (code config.yaml: 0.5)
    global_hidden: int = 256  # hidden width of the projection MLP on the pooled bottleneck (code: 512)
    global_dim: int = 128  # global embedding size (code: 256)
    local_temperature: float = 0.1  # supervised local contrast tau (code run script: 0.1; SupConLoss default 0.07)
    dense_hidden: int = 64  # hidden width of the 1x1-conv dense head on dec[-1] (code: 256 on a 64-channel map)
    dense_dim: int = 32  # pixel embedding size (code: 128)
    mode: str = "block"  # block | stride: how pixel pairs are bounded (paper: both, block its best; ACDC val too)
    stride: int = 4  # stride mode: every s-th pixel on each axis (paper and code: 4)
    block_size: int = 16  # block mode: side of the square blocks, pixels (paper: 16)
    loss_form: str = "code"  # code (SupCon L_out, what the code runs) | paper (summed positives / negatives)
    views: str = "intensity"  # intensity (code's "supcon" views) | geometric (aligned back with the inverse affine)
    pair_chunk: int = 4194304  # local loss: most similarity entries held at once (bounds its memory)


@dataclass(frozen=True)
class ARCOConfig:
    """ARCO: mean teacher, relational pre-training, SG/SAG-sampled prototype contrast (You et al. 2023)."""

    ema_momentum: float = 0.99  # teacher = EMA of the student (paper and code: 0.99)
    sampler: str = "sg"  # sg (paper default) | sag | ns | index_order (the official code's index-order groups)
    grid: int = 4  # SG/SAG: G x G spatial cells per class (paper: 9, 16 or 25 cells; code: 16 blocks)
    eval_net: str = "teacher"  # network validated and exported: teacher (EMA) | student (the code saves the student)
    labeled_fraction: float | None = None  # labelled share of each batch; None = train's (paper, code: 1/2)
    # stage 1, relational pre-training: L_sup + L_inst^global + L_inst^local
    tau_s: float = 0.1  # student temperature of the relational KL (paper and code)
    tau_t: float = 0.01  # teacher temperature (paper; the code uses 0.1)
    relational_slices: str = "unlabeled"  # unlabeled (paper) | all (code: labelled slices too)
    queue_size: int = 36  # teacher embeddings in each relational queue (code: K = 36)
    global_hidden: int = 256  # global projector bottleneck -> 256 -> 512 (code)
    global_dim: int = 512
    local_hidden: int = 64  # local 1x1-conv projector on the pooled logits
    local_dim: int = 16  # channels per pooled pixel; a patch embedding is local_dim x 8 x 8
    local_cells: int = 4  # logits pooled to (8 local_cells)^2, cut into 8x8 patches with stride 4 (code: 64/32 on 256)
    global_weight: float = 1.0
    local_weight: float = 1.0
    # stage 2, anatomical contrastive fine-tuning: L_sup + l1 L_contrast + l2 L_unsup + l3 L_nn
    contrast_weight: float = 0.01  # lambda1 (paper, grid-searched on ACDC 1 %)
    unsup_weight: float = 1.0  # lambda2 (paper)
    nn_weight: float = 1.0  # lambda3 (paper)
    temperature: float = 0.5  # tau of L_contrast (paper App. C, code --temp)
    rep_hidden: int = 128  # hidden width of the representation head on the fused features (code: 496 -> 496)
    rep_dim: int = 256  # representation size (paper 512, code 496; smaller for CPU)
    num_queries: int = 256  # anchors per class drawn by the sampler (code)
    num_negatives: int = 512  # negatives per class, shared by its anchors as in the paper's R_k^c (code: 512)
    prototype_samples: int = 256  # class pixels sampled for the class-mean positive (also pushed to the bank)
    bank_size: int = 4096  # per-class FIFO bank of sampled teacher embeddings (code: 30000, 50000 background)
    confidence: float = 0.97  # pseudo-label confidence threshold of L_unsup (code strong_threshold)
    anchor_confidence: float = 0.7  # unlabelled pixels enter L_contrast above this confidence (code weak_threshold)
    unsup_mode: str = "mask"  # mask (paper: confident pixels only) | weight (code: all pixels x confident fraction)
    split_bn: bool = True  # labelled and unlabelled rows in separate forwards (per-group BN statistics; code: mixed)
    cutmix: bool = True  # CutMix the unlabelled batch before the student sees it (code default)
    cutmix_area: float = 0.5  # area fraction of the pasted box (ReCo/ARCO code: 1/2)
    nn_topk: int = 5  # neighbours of L_nn (code)
    nn_queue: int = 36  # FIFO bank of L_nn (paper and code: 36)
    nn_grid: int = 8  # an image's L_nn embedding = representations on an 8x8 point grid (code: the whole map)
    nn_student_grad: bool = True  # paper: L_nn trains the student; false = code (teacher distances, no gradient)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a command; saved as `config.yaml` in every run folder."""

    method: str = "supervised"
    ingest: IngestConfig = field(default_factory=IngestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    gcl: GCLConfig = field(default_factory=GCLConfig)
    arco: ARCOConfig = field(default_factory=ARCOConfig)
    semicl: SemiCLConfig = field(default_factory=SemiCLConfig)
    pdcr: PDCRConfig = field(default_factory=PDCRConfig)


# --------------------------------------------------------------------------------------------------
# loading, overriding, dumping


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), ready for YAML or JSON."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a YAML value to the annotated type of a field."""
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"config key '{where}' must be a mapping, found {value!r}")
        return _merge(typing.cast(Any, tp)(), value, where)  # tp is a dataclass type (a field annotation)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key '{where}' must be a list, found {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, members[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UsageError(f"config key '{where}' must be true or false, found {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"config key '{where}' must be an integer, found {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise UsageError(f"config key '{where}' must be an integer, found {value!r}") from None
        if f != int(f):
            raise UsageError(f"config key '{where}' must be an integer, found {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"config key '{where}' must be a number, found {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"config key '{where}' must be a number, found {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"config key '{where}' must be a string, found {value!r}")
        return str(value)
    return value


def _merge(base: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass `base` with `overrides` (nested dict) applied and type-checked."""
    if not isinstance(overrides, dict):
        raise UsageError(f"config section '{where or 'top level'}' must be a mapping")
    hints = _type_hints(type(base))
    names = [f.name for f in fields(base)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            suggestion = did_you_mean(str(key), names)
            raise UsageError(
                f"unknown config key '{path}'" + (f"; {suggestion}" if suggestion else ""),
                f"valid keys here: {', '.join(names)}",
            )
        current = getattr(base, key)
        if is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, path)
        else:
            changes[key] = _coerce(value, hints[key], path)
    return replace(base, **changes)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["train.steps=100", "gcl.temperature=0.1"]` as a nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, found '{item}'", "example: --set train.steps=200")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UsageError(f"--set expects key=value, found '{item}'", "example: --set train.steps=200")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set key '{key}' conflicts with an earlier --set")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file (safe_load only), with clear errors."""
    p = Path(path)
    if not p.is_file():
        from medcl_cli.errors import InputNotFoundError

        raise InputNotFoundError(f"config file not found: {p}", "check the path given to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {p} is not valid YAML: {exc}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(
    files: list[str | Path] | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """Defaults < each `--config` file < `--set` items < explicit overrides (flags), validated."""
    cfg = base or Config()
    for f in files or []:
        cfg = _merge(cfg, read_yaml(f))
    cfg = _merge(cfg, parse_set(sets))
    if overrides:
        cfg = _merge(cfg, {k: v for k, v in overrides.items() if v is not None})
    return cfg


def with_overrides(cfg: Config, flat: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (`{"train.steps": 10}`), skipping None values (unset flags)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _merge(cfg, nested)


def method_template(key: str) -> dict[str, Any]:
    """The YAML template shipped for method `key` (`templates/<key>.yaml`), or {} when it has none."""
    import importlib.resources

    res = importlib.resources.files("medcl_cli.templates").joinpath(f"{key}.yaml")
    if not res.is_file():
        return {}
    data = yaml.safe_load(res.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def load_method_config(
    method: str | None, files: list[str | Path] | None = None, sets: list[str] | None = None
) -> Config:
    """Defaults < the method's template < `--config` files < `--set`: what `--method KEY` means.

    The template carries the method's own defaults beyond its section (e.g. `pdcr` turns the UAFS block
    on through `model.uafs_at`), so `--method pdcr` alone trains what the paper describes.
    """
    key = method or load_config(files, sets).method
    base = _merge(Config(), method_template(key)) if key else Config()
    return load_config(files, sets, base=base)


def from_dict(data: dict[str, Any]) -> Config:
    """A Config from a dict such as `to_dict(cfg)` or a checkpoint's stored config."""
    return _merge(Config(), data)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]
