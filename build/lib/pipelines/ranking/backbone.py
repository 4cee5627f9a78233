"""The image E_CR (TMCR sec. 3.3): a trainable image backbone under the projection MLP.

``create_backbone(name, weights)`` builds a backbone whose forward returns pooled features:

- ``name``: a timm model name (``swin_base_patch4_window7_224`` as in the paper; a small one
  such as ``mobilenetv3_small_050`` on CPU; timm's ``test_*`` configs for tests), or
  ``torchvision:<name>`` (``torchvision:resnet18``). An unknown name is a ``DataError`` that
  lists the closest known ones.
- ``weights``: ``none`` (random init: stamped ``RANDOM BACKBONE WEIGHTS`` everywhere), a local
  checkpoint file (``.pt`` / ``.pth`` / ``.bin`` read with ``weights_only=True``, or
  ``.safetensors``; keys or shapes that do not fit are a ``DataError`` listing them), or a
  hub tag (timm's pretrained tag, e.g. ``in1k``; needs the network).

``ImageCREncoder`` = backbone + ``CREncoder`` (the same projection MLP the embedding E_CR
is): ``features(x, layer)`` reads the projection's layers; ``embed(x)`` the backbone's
pooled features, which the CR-feature cache stores for the linear probe.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path

import torch
from torch import nn

from pipelines.io import DataError
from pipelines.ranking.encoder import CREncoder

TORCHVISION = "torchvision:"
KEY = "pretrain.image"
RANDOM_BACKBONE_WARNING = "RANDOM E_CR BACKBONE WEIGHTS (pretrain.image.weights: none): not a real result"


def known_backbones() -> list[str]:
    """Every name ``create_backbone`` accepts: timm's models and ``torchvision:<name>``."""
    import timm
    import torchvision

    return sorted(timm.list_models()) + [TORCHVISION + n for n in sorted(torchvision.models.list_models(torchvision.models))]


def _unknown(name: str) -> DataError:
    names = known_backbones()
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    suggest = ["swin_base_patch4_window7_224", "resnet18", "mobilenetv3_small_050", "test_efficientnet", "torchvision:resnet18"]
    return DataError(
        f"params.yaml: {KEY}.backbone = {name!r} is not a known backbone. Closest: {', '.join(close) or 'none'}; "
        f"e.g. {', '.join(suggest)} ({len(names)} known: timm.list_models() and torchvision:<name>)."
    )


def _build(name: str, pretrained_tag: str | None) -> tuple[nn.Module, int]:
    if name.startswith(TORCHVISION):
        import torchvision

        tv = name[len(TORCHVISION):]
        if tv not in torchvision.models.list_models(torchvision.models):
            raise _unknown(name)
        model = torchvision.models.get_model(tv, weights=pretrained_tag)
        for attr in ("fc", "classifier", "heads", "head"):
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module):
                linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
                if linears:
                    setattr(model, attr, nn.Identity())
                    return model, linears[0].in_features
        raise DataError(f"params.yaml: {KEY}.backbone = {name!r}: no classifier (fc / classifier / heads) to remove; use a timm name.")
    import timm

    if not timm.is_model(name):
        raise _unknown(name)
    full = name if not pretrained_tag else f"{name}.{pretrained_tag}"
    model = timm.create_model(full, pretrained=pretrained_tag is not None, num_classes=0)
    # the pooled output's width: after a pre-logits head where the model has one (MobileNetV3's conv_head)
    return model, int(getattr(model, "head_hidden_size", None) or model.num_features)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "backbone"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a state dict ({type(state).__name__}); give {KEY}.weights a state_dict file.")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_backbone_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a local checkpoint into ``model``, strictly; a classifier's keys (which the pooled
    backbone has not) are ignored. Keys or shapes that do not fit are a ``DataError``."""
    path = Path(path)
    state = _read_state(path)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    # the checkpoint's classifier: keys the pooled backbone has not, under a head module name
    head = {k for k in unexpected if k.split(".")[0] in ("fc", "classifier", "head", "heads", "last_linear")}
    unexpected = [k for k in unexpected if k not in head]
    missing = [k for k in own if k not in state]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (file vs backbone)", shapes)):
            if items:
                parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        raise DataError(
            f"{path}: does not fit {KEY}.backbone = {name!r}: {'; '.join(parts)}. "
            f"Give {KEY}.weights a checkpoint of this architecture, or the backbone it was saved from."
        )
    model.load_state_dict({k: state[k] for k in own})


def create_backbone(name: str, weights: str = "none") -> tuple[nn.Module, int, str]:
    """(backbone returning pooled features, their width, a weights description:
    ``random`` / ``checkpoint:<path>`` / ``hub:<tag>``)."""
    weights = str(weights or "none")
    if weights == "none":
        model, dim = _build(name, None)
        return model, dim, "random"
    path = Path(weights)
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt") or path.exists():
        if not path.is_file():
            raise DataError(f"params.yaml: {KEY}.weights = {weights!r}: file not found; give a local checkpoint, a hub tag or none.")
        model, dim = _build(name, None)
        load_backbone_weights(model, path, name)
        return model, dim, f"checkpoint:{path}"
    try:
        model, dim = _build(name, weights)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline hub, unknown tag: one clear message
        raise DataError(
            f"params.yaml: {KEY}.weights = {weights!r}: could not load {name}.{weights} from the hub "
            f"({type(exc).__name__}: {str(exc)[:200]}); give a local checkpoint file, or none for random weights."
        ) from exc
    return model, dim, f"hub:{weights}"


class ImageCREncoder(nn.Module):
    """E_CR on pixels: ``backbone`` (pooled features) -> ``proj`` (``CREncoder``) -> z."""

    kind = "image"

    def __init__(self, backbone: str, hidden: int = 512, dim: int = 128, dropout: float = 0.1, *, image_size: int = 224,
                 resize: int = 256, weights: str = "none"):
        super().__init__()
        self.backbone_name, self.image_size, self.resize = backbone, int(image_size), int(resize)
        self.backbone, feat_dim, self.weights = create_backbone(backbone, weights)
        self.proj = CREncoder(feat_dim, hidden, dim, dropout)

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (what the CR-feature cache holds)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))

    def features(self, x: torch.Tensor, layer: str = "output") -> torch.Tensor:
        return self.proj.features(self.backbone(x), layer)

    def out_dim(self, layer: str = "output") -> int:
        return self.proj.out_dim(layer)

    def spec(self) -> dict:
        return {"kind": "image", "backbone": self.backbone_name, "image_size": self.image_size, "resize": self.resize,
                **self.proj.spec(), "weights": self.weights}


def encoder_from_spec(spec: dict) -> nn.Module:
    """An untrained encoder of a saved ``spec`` (load its state dict next): no weights are fetched."""
    if spec.get("kind", "embedding") == "image":
        return ImageCREncoder(spec["backbone"], spec["hidden"], spec["dim"], spec["dropout"], image_size=spec["image_size"],
                              resize=spec["resize"], weights="none")
    return CREncoder(**{k: spec[k] for k in ("in_dim", "hidden", "dim", "dropout")})


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's tensors (names, shapes, values)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def cr_card(spec: dict | None) -> dict:
    """Which E_CR a model reads (stamped on metrics, runs, version tags and the model card):
    ``cr_encoder`` (embedding / image) and, for the image E_CR, its backbone and weights."""
    if not spec or spec.get("kind", "embedding") != "image":
        return {"cr_encoder": "embedding"}
    return {"cr_encoder": "image", "cr_backbone": spec["backbone"], "cr_backbone_weights": spec["weights"],
            "cr_random_weights": spec["weights"] == "random"}


def stamp_cr(metrics: dict, card: dict) -> dict:
    """``metrics`` with the E_CR card, and ``CR_WARNING`` when the backbone's weights were random."""
    out = {**metrics, **card}
    if card.get("cr_random_weights"):
        out["CR_WARNING"] = RANDOM_BACKBONE_WARNING
    return out


def cr_tags(card: dict) -> dict[str, str]:
    """``cr_card`` as MLflow run / version tags (strings)."""
    tags = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in card.items()}
    if card.get("cr_random_weights"):
        tags["CR_WARNING"] = RANDOM_BACKBONE_WARNING
    return tags
