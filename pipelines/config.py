"""Typed access to ``params.yaml``.

Each stage reads its own block plus the shared ones (``seed``, ``data``, ``mlflow``).
Blocks are dataclasses: an unknown key, a missing required key or a value of the wrong
type is a ``DataError`` that names the file, the dotted key and the fix — a typo in
``params.yaml`` must never silently fall back to a default.

Params are YAML 1.2, read exactly as DVC reads them (ruamel.yaml's safe loader, as in
``dvc.utils.serialize.parse_yaml``): ``dvc exp run -S`` rewrites ``params.yaml`` in YAML 1.2,
where ``off`` is a string and ``1e-3`` a float (YAML 1.1 readers see ``False`` and ``"1e-3"``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from pipelines.io import DataError


@dataclass(frozen=True)
class DataParams:
    name: str = "demo"
    adapter: str = "votes_csv"
    labels: str = "data/demo/labels.csv"
    images: str = "data/demo/images"
    comments: str = "data/demo/comments.jsonl"
    comments_format: str = "auto"
    # Binary-accuracy threshold on the data set's own 1..L scale (AVA convention: 5).
    threshold: float = 5.0
    options: dict = field(default_factory=dict)  # adapter options, e.g. {split: tanet} for ava


@dataclass(frozen=True)
class DemoParams:
    n_images: int = 360
    image_size: int = 224
    seed: int = 0


@dataclass(frozen=True)
class EmbedRayParams:
    """The Ray Data engine of the embed stage (``embed.engine: ray``)."""

    actors: int = 2  # CLIP image-encoder actors (a fixed pool)
    batch_size: int = 64  # images per actor call (and per decode task)
    cpus_per_actor: float = 1.0  # also the actor's torch threads (at least 1)
    gpus_per_actor: float = 0.0  # 0: CPU actors; e.g. 1 (or 0.5: two actors share one GPU)
    decode_cpus: float = 1.0  # per decode task (read + PIL decode + resize / crop)


@dataclass(frozen=True)
class EmbedParams:
    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    # Demo only: use random weights when the hub cannot be reached. Real-data params
    # must leave this off so that nobody trains on random features by accident.
    allow_random_fallback: bool = False
    batch_size: int = 64  # images per forward pass (a GPU wants 256 or more)
    num_workers: int | str = 2  # decode threads; auto: 2 on the CPU, every core but one (<= 16) with a GPU
    chunk_rows: int = 512
    # auto (bf16 where the device runs it natively, else fp32) | fp32 | bf16 | int8 (CPU only);
    # a pure function of the device, recorded in the cache, report.json and card.json
    precision: str = "auto"
    device: str = "cpu"  # where the CLIP model runs: cpu | cuda | cuda:N | auto (cuda when there is one)
    decode: str = "cpu"  # cpu (PIL in threads) | gpu (JPEGs batch-decoded on the model's device, nvjpeg on CUDA)
    # image engine: "local" (this process: decode threads + one model) | "ray" (Ray Data:
    # decode tasks + an actor pool of encoders, on this machine or the RAY_ADDRESS cluster)
    engine: str = "local"
    ray: EmbedRayParams = field(default_factory=EmbedRayParams)
    # "clip": encode with open_clip; "byo": import precomputed item / phrase embedding tables
    source: str = "clip"
    byo_items: str | None = None
    byo_texts: str | None = None
    byo_normalise: bool = False
    byo_logit_scale: float = 1.0


@dataclass(frozen=True)
class FeaturesParams:
    n_clusters: int = 8
    # Multiply cosine similarities by CLIP's logit scale, as the TMCR authors' code does.
    logit_scale: bool = True
    # K-means estimator (pipelines.semantics.fit_kmeans): sample (Lloyd's on at most
    # kmeans_fit_rows training rows) | minibatch | full (every training row)
    kmeans: str = "sample"
    kmeans_fit_rows: int = 50_000
    kmeans_n_init: int | str = "auto"  # auto: 10 restarts up to 10,000 fitted rows, else 3


@dataclass(frozen=True)
class IndexParams:
    low: int = 2
    high: int = 9
    n_per_bin: int | str = "auto"


@dataclass(frozen=True)
class TrainParams:
    """Ray Train settings shared by the training stages."""

    num_workers: int = 1  # 0 = Ray Train local mode (same process); >= 1 = Ray worker actors
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Hand Ray a checkpoint (and a report) every this many epochs and at the last one; each
    # report costs ~1 s with worker actors. The stage's own resume file is written every epoch.
    checkpoint_every: int = 5


@dataclass(frozen=True)
class ImageEncoderParams:
    """The image E_CR (``pretrain.encoder: image``): a backbone trained on pixels."""

    backbone: str = "mobilenetv3_small_050"  # timm name (paper: swin_base_patch4_window7_224) or torchvision:<name>
    weights: str = "none"  # hub tag (online), local checkpoint path, or none (random init, stamped)
    image_size: int = 224  # the random crop (paper: 224)
    resize: int = 256  # resized to this squared first (paper: 256)
    hflip: bool = True
    backbone_lr: float = 1e-4  # the projection MLP uses pretrain.lr
    epochs: int = 4
    batches_per_cluster: int = 5
    precision: str = "auto"  # auto (CUDA: bf16 where supported, else fp16 + GradScaler; CPU: fp32) | fp32 | bf16 | fp16
    loader_workers: int = 2  # decode processes per Ray worker
    # cpu: the loader's processes decode and augment (PIL) | gpu: they only read the files; the training
    # GPU decodes (nvjpeg), resizes, crops and flips (for when the CPU decode rate limits training; CUDA only)
    decode: str = "cpu"
    batch_size: int = 64  # images per forward pass when writing the CR-feature cache
    # GPU speed options (pipelines.train.precision); ignored on CPU, where the numerics stay as they are
    channels_last: bool = True  # NHWC convolutions on CUDA
    fused_optimizer: bool = True  # fused AdamW on CUDA
    compile: bool = False  # torch.compile the model (opt-in: minutes of compile time; reported as compile_s)


@dataclass(frozen=True)
class PretrainParams:
    encoder: str = "embedding"  # embedding (MLP over the cached CLIP embedding) | image (backbone on pixels)
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.05
    tau: float = 0.07
    hidden: int = 512
    dim: int = 128
    dropout: float = 0.1
    batches_per_cluster: int = 30
    batches_per_step: int | str = "auto"  # balanced batches per optimizer step, all workers together (auto: one per worker)
    image: ImageEncoderParams = field(default_factory=ImageEncoderParams)
    ray: TrainParams = field(default_factory=TrainParams)


@dataclass(frozen=True)
class HeadParams:
    protocol: str = "linear_probe"  # linear_probe | fine_tune (of the CR encoder)
    backbone_lr: float = 1e-5  # fine_tune with the image E_CR: the backbone's learning rate (the rest uses head.lr)
    cr_features: str = "hidden"  # hidden (the layer below z) | output (z, the contrastive embedding) | input (E_CR's input: the embedding)
    epochs: int = 30
    lr: float = 1e-4  # TMCR sec. 4.1
    lr_decay: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    tm_dim: int = 128
    tm_whiten: bool = False  # PCA-whiten the standardised TM features (fit on the training rows)
    cr_dim: int = 128
    hidden: int = 256
    dropout: float = 0.2
    emd_r: int = 2
    loss: str = "emd"  # emd (TMCR eq. 14) | re_emd (M+MNet eq. 4)
    use_tm: bool = True
    use_cr: bool = True
    tfa: bool = True
    tfa_tau1: float = 0.2  # ELTA Fig. 5
    tfa_tau2: float = 4.0  # ELTA Fig. 5
    tfa_n_mix: int = 4  # not in the paper; chosen on the real-feature benchmark DEV val
    flsa: bool = True
    flsa_weight: float = 0.1
    # Keep the weights of the epoch with the best validation metric (else the last epoch's):
    # select_on: val_srcc (highest) | val_emd2 (lowest; the plain baselines' rule)
    keep_best: bool = True
    select_on: str = "val_srcc"
    ray: TrainParams = field(default_factory=TrainParams)


@dataclass(frozen=True)
class PseudoSearchParams:
    val_fraction: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    thresholds: list[float] = field(default_factory=lambda: [0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    min_selected: float = 0.2  # fraction of the validation subset the chosen pair must keep


@dataclass(frozen=True)
class SelftrainParams:
    epochs: int = 15
    lr: float = 5e-4
    unlabeled_weight: float = 1.0
    ray: TrainParams = field(default_factory=TrainParams)


@dataclass(frozen=True)
class EvaluateParams:
    tsne_max_points: int = 300
    register: bool = True
    # TMCR long-tail regions: explicit [c0, c1, c2, c3] (Many [c1, c2], Med [c0, c1) and (c2, c3],
    # Few outside), or null for the default rule on the training scores (pipelines.metrics.LT_SHARES)
    lt_edges: list[float] | None = None
    # a balanced long-tail test set in the TMCR authors' CSV layout (image_id, ..., Shot), or null
    lt_balanced_set: str | None = None


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "iaa-tmcr"
    model_name: str = "tmcr"


@dataclass(frozen=True)
class AmpParams:
    enabled: bool = True
    l1: float = 1.0
    l2: float = 0.2
    window: int = 5
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 (where the device has it) | fp32
    init_tau: int = 16
    growth_interval: int = 200
    monitor: str = "auto"  # format the overflow monitor checks: auto (the low dtype; fp16 for an fp32 stand-in) | fp16 | bf16 | fp32


@dataclass(frozen=True)
class MnetParams:
    branch_blocks: int = 19
    attn_reduction: int = 8
    pool_size: int = 1
    fuse_channels: int = 128
    dropout: float = 0.2
    loss: str = "re_emd"  # re_emd | emd
    alpha: float = 10.0
    beta: float = 0.1
    weights: str = ""  # local MobileNetV2 / M+MNet state_dict; empty = random init


@dataclass(frozen=True)
class AesafParams:
    backbone: str = "small"  # small | vgg16
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    group_maps: int = 16
    hidden: int = 32
    split: bool = True
    rec_weight: float = 1.0
    act_weight: float = 0.1
    weights: str = ""


@dataclass(frozen=True)
class ModelParams:
    """The image model families of ``stages/family.py`` (M+MNet, AE fusion)."""

    family: str = "mnet"
    epochs: int = 3
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    image_size: int = 224
    hflip: bool = True
    aspect: str = "square"  # square | keep (short side = image_size, aspect ratio kept)
    optimizer: str = "auto"  # auto (the family's: adam for both, see pipelines.models) | adam | sgd
    momentum: float = 0.9  # sgd only
    crop: str = "auto"  # auto (mnet random, aesaf off) | off | random (resize to image_size * 256/224, random crop)
    corner_grid: str = "auto"  # auto (mnet with_mixed, aesaf off) | off | always | with_mixed
    corner_grid_r: float = 0.1
    schedule: str = "single"  # single | three_stage
    stage2_size: list[int] = field(default_factory=lambda: [248, 312])  # [h, w]
    stage2_from: int = 1  # three_stage without AMP: first stage-2 epoch
    stage3_epochs: int = 1  # three_stage: last epochs back at image_size
    loader_workers: int = 2  # decode processes per Ray worker
    channels_last: bool = True  # CUDA only: NHWC convolutions
    fused_optimizer: bool = True  # CUDA only: the fused Adam / SGD kernel
    amp: AmpParams = field(default_factory=AmpParams)
    mnet: MnetParams = field(default_factory=MnetParams)
    aesaf: AesafParams = field(default_factory=AesafParams)
    ray: TrainParams = field(default_factory=TrainParams)


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    demo: DemoParams = field(default_factory=DemoParams)
    tags: dict = field(default_factory=dict)  # validated by pipelines.tags
    embed: EmbedParams = field(default_factory=EmbedParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    index: IndexParams = field(default_factory=IndexParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    head: HeadParams = field(default_factory=HeadParams)
    pseudo_search: PseudoSearchParams = field(default_factory=PseudoSearchParams)
    selftrain: SelftrainParams = field(default_factory=SelftrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    model: ModelParams = field(default_factory=ModelParams)


def parse_yaml(text: str) -> Any:
    """YAML 1.2 text as DVC parses it (``off`` stays a string, ``1e-3`` is a float)."""
    return YAML(typ="safe", pure=True).load(text)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML 1.2 block text (a string that would read back as another type is quoted)."""
    import io

    out = io.StringIO()
    writer = YAML(typ="safe", pure=True)
    writer.default_flow_style = False
    writer.dump(data, out)
    return out.getvalue()


def read_yaml(path: str | Path, missing_hint: str) -> Any:
    """A YAML 1.2 file's content; a missing or invalid file is a DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; {missing_hint}")
    try:
        return parse_yaml(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc}).") from exc


def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as read from ``source``)."""
    return _build(Params, raw, source, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    return params_from_dict(read_yaml(path, "run from the repository root."), str(path))


def config_from(cls: type, raw: Any, source: str) -> Any:
    """A frozen config dataclass ``cls`` from a mapping (``raw`` as is when it already is one).
    An unknown, missing (a field without a default) or mistyped key is a ``DataError`` naming
    ``source`` and the key: a loop's config is checked where it is built, not deep in training."""
    if isinstance(raw, cls):
        return raw
    if isinstance(raw, dict):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise DataError(f"{source}: missing key(s) {', '.join(missing)}.")
    return _build(cls, raw, source, "")


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise DataError(f"{source}: '{prefix or '<top>'}' must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise DataError(
            f"{source}: unknown param {where}; known keys under "
            f"'{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(known))}. Fix the spelling or remove it."
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, source, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, source, key)
            except DataError:
                continue
        raise DataError(f"{source}: '{key}' = {value!r} is not a valid {hint}.")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise DataError(f"{source}: '{key}' must be a list, got {value!r}.")
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise DataError(f"{source}: '{key}' must be a mapping, got {value!r}.")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise DataError(f"{source}: '{key}' must be true or false, got {value!r}.")
    if hint in (int, float) and isinstance(value, bool):
        raise DataError(f"{source}: '{key}' must be a number, got {value!r}.")
    if not isinstance(value, hint):
        raise DataError(f"{source}: '{key}' must be {hint.__name__}, got {value!r}.")
    return value


def as_dict(obj: Any) -> dict:
    """A dataclass as a plain dict (for MLflow params and model cards)."""
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
