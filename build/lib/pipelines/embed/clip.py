"""Load a frozen open_clip model: built-in name or config JSON, hub weights, checkpoint or none.

`load_clip` is the one entry point. What it returns says exactly which weights are inside
(`ClipBundle.weights`, `ClipBundle.random_weights`), because downstream stages stamp every
metric and MLflow run made from random weights as "not a real result".

Offline behaviour: a hub tag never hangs. Unless ``HF_HUB_OFFLINE`` is already set, the hub
host is probed with a ~2 s timeout; when it cannot be reached, Hugging Face offline mode is
switched on, so only the local HF cache is consulted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import torch

from pipelines.io import DataError

log = logging.getLogger(__name__)

NO_WEIGHTS = {"", "none", "random", "null"}
HUB_PREFIX = "hf-hub:"
PROBE_TIMEOUT_S = 2.0


@dataclass
class ClipBundle:
    """A frozen open_clip model with everything needed to embed images and texts."""

    model: torch.nn.Module  # eval mode, requires_grad False
    preprocess: Callable[[Any], torch.Tensor]  # the eval transform: PIL image -> CHW tensor
    tokenizer: Callable[..., torch.Tensor]
    name: str  # open_clip model name (config file stem for a JSON config)
    weights: str  # "pretrained:<tag>" | "checkpoint:<path>" | "random"
    random_weights: bool
    embed_dim: int
    device: str = "cpu"
    weights_sha256: str | None = field(default=None, repr=False)  # for checkpoint files

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this model's embeddings (for cache invalidation)."""
        import open_clip

        fp: dict[str, Any] = {
            "model": self.name,
            "weights": self.weights,
            "random_weights": self.random_weights,
            "embed_dim": self.embed_dim,
            "open_clip": open_clip.__version__,
        }
        if self.weights_sha256:
            fp["weights_sha256"] = self.weights_sha256
        return fp


def load_clip(
    model: str,
    pretrained: str | None,
    *,
    allow_random_fallback: bool = False,
    device: str = "cpu",
    seed: int | None = None,
) -> ClipBundle:
    """Build an open_clip model in eval mode with frozen parameters.

    ``seed``: when the result has random weights (``pretrained: none`` or the fallback), the
    RNG is seeded right before the model is built, so the same seed gives the same weights
    whatever was tried first (a failed hub load builds a model too). The registry's scoring
    model relies on this to rebuild a random-init CLIP without shipping its weights.

    Args:
        model: an open_clip model name ("ViT-B-32") or a path to a model-config JSON file
            (registered with ``open_clip.add_model_config``; the model name is the file stem).
        pretrained: "none" (deliberate random init), a pretrained tag of that model
            ("laion2b_s34b_b79k"), "hf-hub:org/repo" (config and weights from that hub repo),
            or the path of a local checkpoint file (state dict or open_clip checkpoint).
        allow_random_fallback: when the weights cannot be had (hub unreachable and not cached,
            checkpoint file missing), warn loudly and return random weights instead of raising.
            For demos only: the bundle then says ``random_weights=True``.
        device: torch device for the model.

    Raises:
        DataError: unknown model or tag, unreadable checkpoint, or weights unavailable without
            the fallback. The message names the model/tag and the fix.
    """
    import open_clip

    name = _resolve_model_name(model)
    spec = "none" if pretrained is None else str(pretrained).strip()

    if spec.lower() in NO_WEIGHTS:
        return _build(name, None, weights="random", device=device, seed=seed)

    ckpt = Path(spec).expanduser()
    if ckpt.is_file():
        return _build(name, str(ckpt), weights=f"checkpoint:{spec}", device=device)

    if spec.startswith(HUB_PREFIX):
        source, cfg = spec, {"hf_hub": spec[len(HUB_PREFIX):]}
    elif _looks_like_path(spec):
        return _unavailable(
            name, spec, f"checkpoint file {ckpt} does not exist", allow_random_fallback, device, seed
        )
    else:
        cfg = open_clip.get_pretrained_cfg(name, spec)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise DataError(
                f"pretrained={spec!r} is neither a known tag of model {name!r} nor an existing "
                f"checkpoint file. Known tags: {tags or 'none (custom config)'}; or use "
                f"pretrained: none for random weights."
            )
        source = spec

    offline_reason = _ensure_reachable_or_offline(cfg)
    try:
        with _socket_timeout(30.0 if offline_reason is None else PROBE_TIMEOUT_S):
            if source.startswith(HUB_PREFIX):
                return _build(source, None, weights=f"pretrained:{spec}", device=device, hub=True)
            return _build(name, source, weights=f"pretrained:{spec}", device=device)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - download/cache errors come in many types
        why = f"{type(exc).__name__}: {exc}"
        if offline_reason:
            why = f"{offline_reason}, and not in the local cache ({why})"
        return _unavailable(name, spec, why, allow_random_fallback, device, seed)


def _resolve_model_name(model: str) -> str:
    """Return the open_clip model name, registering a config JSON file if given one."""
    import open_clip

    model = str(model).strip()
    path = Path(model).expanduser()
    if model.endswith(".json") or path.is_file():
        if not path.is_file():
            raise DataError(f"model config {path} not found; fix embed.model (a file or a name).")
        open_clip.add_model_config(path)
        name = path.stem
    else:
        name = model
    if name.replace("/", "-") not in open_clip.list_models():
        raise DataError(
            f"unknown open_clip model {model!r}; use a name from open_clip.list_models() "
            f"(e.g. ViT-B-32, ViT-L-14) or the path of a model-config JSON file (hub repos go "
            f"in `pretrained`: hf-hub:org/repo)."
        )
    return name


def _build(
    name: str, checkpoint: str | None, *, weights: str, device: str, hub: bool = False,
    seed: int | None = None,
) -> ClipBundle:
    """Create the model + eval transform + tokenizer and freeze the model."""
    import open_clip

    random_weights = weights == "random"
    kwargs: dict[str, Any] = {"device": device}
    if random_weights:
        kwargs.update(pretrained_image=False, pretrained_text=False)  # no tower downloads
        if seed is not None:
            torch.manual_seed(seed)
    elif not hub:
        kwargs["pretrained"] = checkpoint
    with warnings.catch_warnings(), _quiet_open_clip(random_weights):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        except Exception as exc:  # noqa: BLE001 - torch.load / state-dict errors vary
            if weights.startswith("checkpoint:"):
                raise DataError(
                    f"{checkpoint}: cannot load it into model {name!r} ({exc}). Point "
                    f"embed.pretrained at a checkpoint of this architecture."
                ) from exc
            raise
        tokenizer = open_clip.get_tokenizer(name)
    model.eval().requires_grad_(False)
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        weights=weights,
        random_weights=random_weights,
        embed_dim=_embed_dim(model, preprocess, device),
        device=device,
        weights_sha256=_sha256(checkpoint) if weights.startswith("checkpoint:") else None,
    )


def _unavailable(
    name: str, spec: str, why: str, allow_random_fallback: bool, device: str, seed: int | None = None
) -> ClipBundle:
    """Weights cannot be had: random weights with a loud warning, or a DataError."""
    if not allow_random_fallback:
        raise DataError(
            f"cannot load weights {spec!r} for model {name!r}: {why}. Fix: run once with network "
            f"access (the weights are then cached), or set embed.pretrained to a local checkpoint "
            f"file, or (demo only) set embed.allow_random_fallback: true to use random weights."
        )
    msg = (
        f"!!! RANDOM WEIGHTS: weights {spec!r} for model {name!r} are unavailable ({why}). "
        f"Falling back to randomly initialised weights: every embedding, metric and run made "
        f"from them is NOT a real result."
    )
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return _build(name, None, weights="random", device=device, seed=seed)


def _looks_like_path(spec: str) -> bool:
    suffixes = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    return os.sep in spec or spec.startswith(("~", ".")) or spec.endswith(suffixes)


def _hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _set_hub_offline() -> None:
    """Switch Hugging Face offline mode on, also in an already imported huggingface_hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read once at import time: patch the live value


def _ensure_reachable_or_offline(cfg: dict[str, Any]) -> str | None:
    """Make a hub/URL download fail fast when offline. Returns why we are offline, or None.

    With ``HF_HUB_OFFLINE`` already set, it is made effective and nothing is probed.
    Otherwise the download host is probed; an unreachable hub switches offline mode on.
    """
    if cfg.get("hf_hub"):
        if _hub_offline_env():
            _set_hub_offline()
            return "HF_HUB_OFFLINE is set"
        host = urlparse(_hub_endpoint()).hostname or "huggingface.co"
        if not _reachable(host):
            _set_hub_offline()
            return f"the hub ({host}) is unreachable"
        return None
    url = cfg.get("url")
    if url:
        host = urlparse(url).hostname or ""
        if not _reachable(host):
            return f"{host} is unreachable"
    return None


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """TCP-connect to host:port within ``timeout`` s (DNS included: runs in a daemon thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound plain-socket downloads (open_clip's URL fetches use urllib without a timeout)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def _quiet_open_clip(random_weights: bool) -> Iterator[None]:
    """Silence open_clip's 'No pretrained weights loaded' when random init is deliberate."""
    logger = logging.getLogger()
    filt = _DropMessage("No pretrained weights loaded")
    if random_weights:
        logger.addFilter(filt)
    try:
        yield
    finally:
        logger.removeFilter(filt)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _embed_dim(model: torch.nn.Module, preprocess: Any, device: str) -> int:
    """Output width of the image tower (read off the module, else one dummy forward)."""
    visual = getattr(model, "visual", None)
    dim = getattr(visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    size = getattr(visual, "image_size", (224, 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])


def _sha256(path: str | None, block: int = 1 << 20) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
