"""MLflow pyfunc models that score images end to end, their inputs' limits, and their logging.

Two scorers behind one pyfunc class (``ScoringModel``), picked by the model's artifacts:

``TMCRScorer`` (artifact ``bundle``, ``stages/evaluate.py``): the bundle holds what inference
needs: the CLIP model reference (name + weights: hub tag, bundled checkpoint, or the seed of a
random init), the embed stage's precision path and batch size, the tag libraries with their
text embeddings, and the trained head (which contains E_CR). Output: score, distribution, top
tags. Its numerics are the pipeline's: batches as the embed stage cut them, collated like the
embed stage, the image tower on the embed stage's precision path (``precision``, e.g. int8),
``TagMatcher`` and ``predict_logits`` as in training and the evaluate stage.

``FamilyScorer`` (artifact ``family``, ``stages/family.py``): the saved family state
(``models/family.pt``: ``arch``, ``model``, ``config``), rebuilt as
``pipelines.models.image_loop.model_from_state`` does (``family_model``) and fed pixels
preprocessed exactly as the training-time ``predict`` does. Output: score, distribution.

What loading imports: only what scoring needs (torch, open_clip for TMCR, numpy, pandas,
PIL, mlflow and the light parts of ``pipelines``): no Ray, no training loops, no DVC, no
params parser. ``SERVED_REQUIREMENTS`` declares exactly those distributions (pinned) with
the model, so ``mlflow models serve --env-manager virtualenv`` or a container built from the
model's own requirements can load it. After loading, and after a request with a very large
image, freed memory is handed back to the OS (``release_memory``).

Every request goes through the same steps (``Scorer.predict``): check the request (its
columns, at most ``max_rows`` rows), then per batch of rows: read the row's bytes (``image``
bytes or base64 text; ``path`` only under the operator's ``path_root``), decode them
(``decode_image``: known formats only, at most ``max_pixels`` pixels, checked from the header
before any pixel is decoded), the per-image transform, then the batch through the model. A bad
row gives a per-row ``error`` (and ``null`` score), never a failed request; a bad request (no
known column, too many rows, a bad ``top_k``) is an ``MlflowException`` with
``INVALID_PARAMETER_VALUE``, which ``mlflow models serve`` answers with a 400.

The model is logged from code (``pipelines/tracking/served_model.py``, MLflow's
models-from-code): loading it imports this module and reads the artifacts with
``weights_only=True``; nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

BUNDLE = "bundle.pt"
MODEL_CODE = Path(__file__).with_name("served_model.py")  # the models-from-code file
AESTHETICS_COLUMNS = ["score", "distribution", "top_semantic", "top_attribute", "error"]  # TMCR output
FAMILY_COLUMNS = ["score", "distribution", "error"]  # image-family output
INPUTS = {"image": "image bytes (base64 text in JSON)", "path": "an image file under the serving path root"}
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")  # the only decoders PIL may use
MAX_TOP_K = 100
MODEL_CONFIG = {"path_root": ""}  # logged with the model: what ``load_model(model_config=...)`` may set (unset here)

# operator settings (environment of `mlflow models serve`; ``model_config`` of load_model wins)
ENV = {"path_root": "IAA_SERVE_PATH_ROOT", "max_rows": "IAA_SERVE_MAX_ROWS", "max_pixels": "IAA_SERVE_MAX_PIXELS",
       "max_image_bytes": "IAA_SERVE_MAX_IMAGE_BYTES", "max_concurrent": "IAA_SERVE_MAX_CONCURRENT"}


@dataclass(frozen=True)
class Limits:
    """What a request may ask of the model (see the README's serving section).

    ``path_root``: ``path`` inputs are read only under this folder (None: paths are refused,
    the default when serving). ``max_rows`` per request; ``max_pixels`` (width x height) and
    ``max_image_bytes`` per image; ``max_concurrent`` requests decoding / scoring at once
    (the others wait), which bounds the memory of concurrent clients.
    """

    path_root: Path | None = None
    max_rows: int = 1000
    max_pixels: int = 50_000_000  # 50 MP: a 48 MP phone photo passes; 2.5 G (50,000 x 50,000) does not
    max_image_bytes: int = 32 * 2**20
    max_concurrent: int = 2

    @classmethod
    def load(cls, config: dict | None = None, environ: dict | None = None) -> Limits:
        """From ``config`` (a pyfunc ``model_config``; an empty value is unset), else the ``IAA_SERVE_*``
        variables, else the defaults."""
        config, environ = dict(config or {}), os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, var in ENV.items():
            raw = config.get(key)
            if raw is None or raw == "":
                raw = environ.get(var)
            if raw is None or raw == "":
                continue
            if key == "path_root":
                root = Path(str(raw)).expanduser().resolve()
                if not root.is_dir():
                    raise MlflowException(f"{var} / model_config path_root = {raw!r}: not a folder; give the folder "
                                          "whose images `path` inputs may name.", INVALID_PARAMETER_VALUE)
                values[key] = root
                continue
            try:
                values[key] = int(raw)
            except (TypeError, ValueError):
                values[key] = 0
            if values[key] < 1:
                raise MlflowException(f"{var} / model_config {key} = {raw!r}: give a whole number >= 1.", INVALID_PARAMETER_VALUE)
        return cls(**values)


class RowError(ValueError):
    """A row that cannot be scored; the message is what the client reads in ``error``."""


def request_error(message: str) -> MlflowException:
    """A bad request as a whole (``mlflow models serve`` answers it with a 400)."""
    return MlflowException(message, INVALID_PARAMETER_VALUE)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def check_request(model_input: Any, limits: Limits) -> pd.DataFrame:
    """The request as a DataFrame with an ``image`` or ``path`` column and at most ``max_rows`` rows."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise request_error(f"send a table of rows (dataframe_split / dataframe_records), not {type(model_input).__name__}.")
    if not set(INPUTS) & set(model_input.columns):
        accepted = "; ".join(f"'{c}': {d}" for c, d in INPUTS.items())
        raise request_error(f"the request has no 'image' or 'path' column; this model reads the columns {accepted} "
                            "(other columns are ignored).")
    if len(model_input) > limits.max_rows:
        raise request_error(f"{len(model_input)} rows in one request; the limit is {limits.max_rows} "
                            f"({ENV['max_rows']}): split the request.")
    return model_input


def row_bytes(row: pd.Series, limits: Limits) -> bytes:
    """The encoded image of one row: ``image`` bytes, ``image`` base64 text, else the file ``path``."""
    img, path = row.get("image"), row.get("path")
    if not _missing(img):
        if isinstance(img, (bytes, bytearray, memoryview)):
            data = bytes(img)
        elif isinstance(img, str):  # base64 text (JSON clients)
            if len(img) > 4 * limits.max_image_bytes // 3 + 4:
                raise RowError(f"'image' is {len(img)} characters of base64; the limit is {limits.max_image_bytes} bytes decoded.")
            try:
                data = base64.b64decode(img, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise RowError(f"'image' is text but not base64-encoded image bytes ({exc}).") from None
        else:
            raise RowError(f"'image' must be image bytes or base64 text, not {type(img).__name__}.")
    elif not _missing(path):
        data = _read_under_root(path, limits)
    else:
        raise RowError("the row has neither 'image' bytes nor a 'path'.")
    if len(data) > limits.max_image_bytes:
        raise RowError(f"the image is {len(data)} bytes; the limit is {limits.max_image_bytes} ({ENV['max_image_bytes']}).")
    return data


def _read_under_root(path: Any, limits: Limits) -> bytes:
    """The bytes of a ``path`` input, which must name a regular file under ``limits.path_root``.

    The rule is checked on the resolved path (symlinks followed) before the file is opened, and
    the message is the same whether or not the file exists, so a client learns nothing about
    files outside the root.
    """
    root = limits.path_root
    if root is None:
        raise RowError(f"'path' inputs are off on this server: send the image bytes in 'image' (base64 in JSON); "
                       f"the operator may allow paths under one folder with {ENV['path_root']}.")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise RowError("'path' must be a file name: non-empty text without NUL characters.")
    target = (root / path).resolve()  # an absolute path stays absolute
    if not target.is_relative_to(root):
        raise RowError("'path' must name a file under the serving path root.")
    if not target.is_file():
        raise RowError(f"no image file {path!r} under the serving path root.")
    with open(target, "rb") as f:
        return f.read(limits.max_image_bytes + 1)


def decode_image(data: bytes, limits: Limits):
    """The RGB PIL image of encoded bytes: formats ``FORMATS`` only, at most ``max_pixels`` pixels
    (from the header, before decoding: a 50,000 x 50,000 PNG is refused without allocating it)."""
    from PIL import Image, UnidentifiedImageError

    # PIL warns between its two limits; ours (checked below) is lower, and the row's error says so
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise RowError(f"the image is too large to decode ({exc}); the limit is {limits.max_pixels} pixels.") from None
    except Exception as exc:  # noqa: BLE001 - not an image of a known format, or a broken header
        start = data[:8].hex(" ") if data else "nothing"
        detail = "" if isinstance(exc, UnidentifiedImageError) else f"; {type(exc).__name__}: {exc}"
        raise RowError(f"not a readable {', '.join(FORMATS)} image ({len(data)} bytes, starting {start}{detail}).") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise RowError(f"the image is {w} x {h} = {w * h} pixels; the limit is {limits.max_pixels} ({ENV['max_pixels']}).")
    try:
        return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data: PIL raises many kinds
        raise RowError(f"cannot decode the {im.format} image ({type(exc).__name__}: {exc}).") from None


def read_row_image(row: pd.Series, limits: Limits | None = None):
    """The RGB PIL image of one input row (``row_bytes`` then ``decode_image``); in-process
    callers without ``limits`` may read any ``path`` (the root is the file system)."""
    limits = limits or Limits(path_root=Path("/"))
    return decode_image(row_bytes(row, limits), limits)


def error_row(exc: Exception) -> dict[str, Any]:
    """The output of a row that could not be scored (the request goes on)."""
    message = str(exc) if isinstance(exc, RowError) else f"{type(exc).__name__}: {exc}"
    return {"score": None, "distribution": None, "error": message}


def score_rows(probs: np.ndarray) -> list[dict[str, Any]]:
    """Score (mean level, 1..L: ``dist_to_score``) and distribution of each predicted distribution."""
    from pipelines.metrics import dist_to_score

    probs = np.asarray(probs, dtype=np.float64)
    scores = dist_to_score(probs) if len(probs) else np.zeros(0)
    rows = []
    for s, p in zip(scores, probs, strict=True):
        if not (np.isfinite(s) and np.isfinite(p).all()):
            rows.append(error_row(RowError("the model gave a non-finite score for this image.")))
        else:
            rows.append({"score": float(s), "distribution": p.tolist(), "error": None})
    return rows


def output_frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """One row per input row; object columns, so that a missing value is None (JSON ``null``), never NaN."""
    return pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in columns})


BIG_PIXELS = 4_000_000  # a request with an image above this many pixels hands freed memory back to the OS after


def release_memory() -> None:
    """Hand freed heap memory back to the OS: ``gc.collect()`` then glibc's ``malloc_trim(0)``
    (a no-op where there is no glibc). Without it, the buffers of a few very large images stay
    in glibc's arenas and the server's RSS stays at its peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def drop_text_tower(model: torch.nn.Module) -> None:
    """Free an open_clip model's text tower: the served model has its tags' text embeddings in
    the bundle and only ever encodes images (ViT-B-32: 63 M parameters, ~250 MB)."""
    for name in ("transformer", "token_embedding", "ln_final", "text"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            setattr(model, name, None)
    for name in ("positional_embedding", "text_projection"):
        if isinstance(getattr(model, name, None), torch.nn.Parameter):
            setattr(model, name, None)
    if isinstance(getattr(model, "attn_mask", None), torch.Tensor) and "attn_mask" in model._buffers:
        model._buffers["attn_mask"] = None


FAMILY_MODES = {"square": "resize", "keep": "short_side"}  # arch aspect -> resize mode at prediction


def family_aspect(arch: dict) -> str:
    """The ``aspect`` a family model was trained with (``square`` for files saved before it was
    recorded), as ``pipelines.models.image_loop.arch_aspect``."""
    from pipelines.io import DataError

    aspect = arch.get("aspect", "square")
    if aspect not in FAMILY_MODES:
        raise DataError(f"model.aspect = {aspect!r}; use one of {tuple(FAMILY_MODES)}.")
    return aspect


def family_model(state: dict) -> torch.nn.Module:
    """A trained family model from its saved state (``arch`` + ``model``), in eval mode, as
    ``pipelines.models.image_loop.model_from_state`` rebuilds it, without the training loop's imports."""
    from pipelines.models import build

    arch = state["arch"]
    opts = {k: v for k, v in arch["options"].items() if k != "weights"}
    model = build(arch["family"], arch["n_levels"], opts)
    model.load_state_dict(state["model"])
    return model.eval()


class Scorer:
    """decode -> validate -> per-image transform -> batch -> model, for every request (``predict``)."""

    columns: list[str]
    batch_size: int = 32

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def transform(self, image) -> Any:
        """One decoded RGB image -> what ``score_batch`` takes."""
        raise NotImplementedError

    def score_batch(self, items: list[Any], params: dict[str, Any]) -> list[dict[str, Any]]:
        """Output rows for a batch of transformed images."""
        raise NotImplementedError

    def check_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = check_request(model_input, self.limits)
        params = self.check_params(params)
        rows: list[dict | None] = [None] * len(df)
        big = False
        for start in range(0, len(df), self.batch_size):  # read and score batch by batch
            ready: list[tuple[int, Any]] = []
            for i in range(start, min(start + self.batch_size, len(df))):
                try:
                    image = decode_image(row_bytes(df.iloc[i], self.limits), self.limits)
                    big = big or image.width * image.height > BIG_PIXELS
                    ready.append((i, self.transform(image)))
                    del image
                except Exception as exc:  # noqa: BLE001 - per-row error: one bad image must not sink the request
                    rows[i] = error_row(exc)
            if ready:
                for (i, _), out in zip(ready, self.score_batch([x for _, x in ready], params), strict=True):
                    rows[i] = out
        if big:  # the decoded pixels are freed; give their pages back rather than keep the peak
            release_memory()
        return output_frame(rows, self.columns)


class TMCRScorer(Scorer):
    """CLIP image tower + tag matching + the TMCR head, from ``bundle.pt`` (``make_bundle``)."""

    columns = AESTHETICS_COLUMNS

    def __init__(self, artifacts: dict[str, str], limits: Limits) -> None:
        from pipelines.embed.clip import load_clip
        from pipelines.embed.encode import BUILDERS, ImageDecoder
        from pipelines.heads.build import head_from_arch
        from pipelines.io import load_torch
        from pipelines.semantics.match import TagMatcher

        super().__init__(limits)
        b = load_torch(artifacts["bundle"])
        card = b["card"]
        model_ref = artifacts.get("clip_config", card["model"])
        pretrained = artifacts.get("clip_checkpoint")
        if pretrained is None:
            pretrained = "none" if card["random_weights"] else card["pretrained"]
        clip = load_clip(model_ref, pretrained, allow_random_fallback=False, seed=card["init_seed"])
        if clip.random_weights != bool(card["random_weights"]):
            raise RuntimeError(f"CLIP weights differ from training: {clip.weights} vs {card['weights']}")
        drop_text_tower(clip.model)  # the tag embeddings are in the bundle: scoring never encodes text
        self.head = head_from_arch(b["arch"])
        self.head.load_state_dict(b["model"])
        self.head.eval()
        self.precision = b.get("precision", "fp32")  # bundles written before it was recorded: fp32
        self.batch_size = int(b.get("batch_size", 64))
        self.decoder = ImageDecoder(clip.preprocess)
        self.encode = BUILDERS[self.precision](clip)
        if self.precision != "fp32":  # the int8 / bf16 tower is a copy: the fp32 one is no longer needed
            clip.model.visual = None
        self.clip_ref = {"model": model_ref, "pretrained": pretrained, "weights": clip.weights}
        del clip
        self.tags, self.kinds = np.asarray(b["tags"]), list(b["kinds"])
        self.matcher, self.card = TagMatcher(b["tag_emb"].numpy(), self.kinds, float(b["scale"])), card
        kinds = np.asarray(self.kinds)
        self.names = {k: self.tags[kinds == k] for k in ("semantic", "attribute")}
        self.cr_backbone = None
        if b.get("cr_encoder") is not None:  # image E_CR: its CR input from pixels (needs timm)
            from pipelines.ranking.cr_features import cr_backbone_from_bundle

            self.cr_backbone = cr_backbone_from_bundle(b["cr_encoder"])
        release_memory()

    def transform(self, image) -> Any:
        item = self.decoder.transform(image)  # the embed stage's per-image step (uint8 array)
        if self.cr_backbone is None:
            return item
        from pipelines.ranking.cr_features import cr_views

        return item, cr_views(self.cr_backbone, [image])[0]  # + the image E_CR's evaluation view

    def check_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        top_k = (params or {}).get("top_k", 3)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= MAX_TOP_K:
            raise request_error(f"param top_k = {top_k!r}; give a whole number from 0 to {MAX_TOP_K}.")
        return {"top_k": int(top_k)}

    @torch.inference_mode()
    def score_batch(self, items: list[Any], params: dict[str, Any]) -> list[dict[str, Any]]:
        from pipelines.heads.build import predict_logits

        views = None
        if self.cr_backbone is not None:
            items, views = [i for i, _ in items], torch.stack([v for _, v in items])
        x = self.decoder.collate(items)  # the embed stage's collate (bit-identical input)
        emb = self.encode(x).numpy()  # embed: the image tower on the embed stage's precision path
        sem, attr = self.matcher.split(self.matcher.numpy(emb))  # TM, the function training computes it with
        # head (E_CR inside): a head whose E_CR reads pixels takes ``x`` here
        cr_in = emb if views is None else self.cr_backbone.embed(views).float().numpy()  # the CR-feature cache's values
        probs = torch.softmax(torch.from_numpy(predict_logits(self.head, self.matcher, emb, cr_in)), 1).numpy()
        k = params["top_k"]
        out = score_rows(probs)
        for row, s, a in zip(out, sem, attr, strict=True):
            if row["error"] is None:
                row["top_semantic"] = self.names["semantic"][np.argsort(-s, kind="stable")[:k]].tolist()
                row["top_attribute"] = self.names["attribute"][np.argsort(-a, kind="stable")[:k]].tolist()
        return out


class FamilyScorer(Scorer):
    """An image-family model (``stages/family.py``): artifact ``family`` = the saved state.

    Each image is preprocessed like the training-time ``predict``: resized to ``image_size``
    squared (``aspect: square``; batched), or short side ``image_size`` with the aspect ratio
    kept (``aspect: keep``; one image per forward pass, unpadded), then normalised.
    """

    columns = FAMILY_COLUMNS

    def __init__(self, artifacts: dict[str, str], limits: Limits) -> None:
        from pipelines.io import load_torch

        super().__init__(limits)
        state = load_torch(artifacts["family"])
        self.model = family_model(state)
        arch = state["arch"]
        self.family, self.size, self.aspect = arch["family"], int(arch["image_size"]), family_aspect(arch)
        self.mode = FAMILY_MODES[self.aspect]
        release_memory()

    def transform(self, image) -> torch.Tensor:
        from pipelines.images import image_tensor, normalise

        return normalise(image_tensor(image, (self.size, self.size), self.mode))

    @torch.inference_mode()
    def score_batch(self, items: list[torch.Tensor], params: dict[str, Any]) -> list[dict[str, Any]]:
        step = len(items) if self.aspect == "square" else 1  # keep: sizes differ, no padding
        probs = [self.model(torch.stack(items[j : j + step]))["probs"].float().numpy() for j in range(0, len(items), step)]
        return score_rows(np.concatenate(probs))


class ScoringModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model of every registered scorer: ``TMCRScorer`` when the artifacts hold a
    ``bundle``, ``FamilyScorer`` when they hold a ``family`` state. ``Limits`` come from the
    load's ``model_config`` or the ``IAA_SERVE_*`` variables."""

    def load_context(self, context) -> None:
        limits = Limits.load(getattr(context, "model_config", None))
        self.scorer = TMCRScorer(context.artifacts, limits) if "bundle" in context.artifacts else FamilyScorer(context.artifacts, limits)
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with self.slots:
            return self.scorer.predict(model_input, params)


def make_bundle(path: Path, *, head_state: dict, card: dict, tags: list[str], kinds: list[str], tag_emb: np.ndarray,
                logit_scale: float, precision: str = "fp32", batch_size: int = 64, cr_encoder: dict | None = None) -> None:
    """Write the TMCR scoring bundle: plain data only (tensors, dicts, lists, str, numbers), so that
    it loads with ``weights_only=True``. ``precision`` / ``batch_size``: the embed stage's path
    (``precision_used`` of the embedding cache's meta) and batch size, which the scorer reuses.
    ``cr_encoder``: the image E_CR's spec + backbone weights (``pipelines.ranking.cr_features.bundle_cr_encoder``),
    whose features are the head's CR input; None when E_CR reads the CLIP embedding."""
    from pipelines.embed.encode import BUILDERS
    from pipelines.io import save_torch

    if precision not in BUILDERS:
        raise ValueError(f"precision {precision!r} is not one of {sorted(BUILDERS)}")
    bundle = {
        "arch": head_state["arch"], "model": head_state["model"], "card": dict(card),
        "tags": [str(t) for t in tags], "kinds": [str(k) for k in kinds],
        "tag_emb": torch.tensor(np.asarray(tag_emb, np.float32)), "scale": float(logit_scale),
        "precision": str(precision), "batch_size": int(batch_size), "cr_encoder": cr_encoder,
    }
    save_torch(bundle, path)


def input_example() -> pd.DataFrame:
    """A one-row request (a 16 x 16 grey PNG as base64 text) that MLflow stores with the model
    and checks against the signature when logging it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


# What each kind of served model imports (``tests/test_serve_imports.py`` loads and scores each
# one with every other installed package blocked): distributions, pinned at log time.
SERVED_REQUIREMENTS = {
    "tmcr": ("torch", "torchvision", "open_clip_torch", "numpy", "pandas", "pillow", "mlflow"),
    "aesaf": ("torch", "numpy", "pandas", "pillow", "mlflow"),
    "mnet": ("torch", "torchvision", "numpy", "pandas", "pillow", "mlflow"),  # MobileNetV2 sub-branches
}
IMAGE_CR_REQUIREMENTS = ("timm",)  # a TMCR bundle whose E_CR reads pixels builds a timm backbone


def served_requirements(kind: str, *, image_cr: bool = False) -> list[str]:
    """The pinned pip requirements of a served model of ``kind`` (``tmcr``, or a family: ``aesaf``, ``mnet``):
    exactly the distributions its scoring code imports, at the installed versions."""
    if kind not in SERVED_REQUIREMENTS:
        raise ValueError(f"kind must be one of {sorted(SERVED_REQUIREMENTS)}, got {kind!r}")
    return requirements(SERVED_REQUIREMENTS[kind] + (IMAGE_CR_REQUIREMENTS if image_cr else ()))


def bundle_requirements(bundle_path: Path) -> list[str]:
    """``served_requirements`` of a TMCR bundle (``timm`` only when its E_CR reads pixels)."""
    from pipelines.io import load_torch

    return served_requirements("tmcr", image_cr=load_torch(bundle_path).get("cr_encoder") is not None)


def log_scoring_model(bundle_path: Path, card: dict, *, registered_name: str | None,
                      pip_requirements: list[str] | None = None) -> Any:
    """Log the TMCR pyfunc model in the active run (and register it when a name is given).
    ``pip_requirements``: None (the default) declares ``bundle_requirements(bundle_path)``."""
    artifacts = {"bundle": str(bundle_path)}
    if str(card["model"]).endswith(".json"):
        artifacts["clip_config"] = str(Path(card["model"]).resolve())
    if str(card["weights"]).startswith("checkpoint:"):
        artifacts["clip_checkpoint"] = str(Path(card["weights"].split(":", 1)[1]).resolve())
    reqs = bundle_requirements(bundle_path) if pip_requirements is None else pip_requirements
    return _log_model(artifacts, signature(), registered_name, reqs)


def log_family_model(state_path: Path, *, registered_name: str | None, pip_requirements: list[str] | None = None) -> Any:
    """Log an image-family pyfunc model (``FamilyScorer``) in the active run (and register it when a
    name is given). ``pip_requirements``: None (the default) declares ``served_requirements`` of its family."""
    from pipelines.io import load_torch

    if pip_requirements is None:
        pip_requirements = served_requirements(str(load_torch(state_path)["arch"]["family"]))
    return _log_model({"family": str(state_path)}, family_signature(), registered_name, pip_requirements)


def _log_model(artifacts: dict[str, str], sig, registered_name: str | None, pip_requirements: list[str]) -> Any:
    """Models-from-code: MLflow stores ``MODEL_CODE`` and the ``pipelines`` package, not a pickle."""
    import pipelines

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        signature=sig,
        input_example=input_example(),
        code_paths=[str(Path(pipelines.__file__).parent)],
        model_config=dict(MODEL_CONFIG),
        registered_model_name=registered_name,
        pip_requirements=pip_requirements,
    )


def requirements(packages: tuple[str, ...] = SERVED_REQUIREMENTS["mnet"]) -> list[str]:
    """Pinned pip requirements (the installed versions) of ``packages``."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in packages]


def _signature(columns: list[str], params: list | None = None):
    """Inputs: ``image`` (bytes, or base64 text in JSON) and/or ``path`` (text); outputs ``columns``.

    Both input columns are optional, so a request may carry either. ``image`` is typed ``Any``
    so that MLflow passes every value through and a bad one (not base64, a number) is a per-row
    error of this model, not a failed request.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, Schema

    specs = {
        "score": ColSpec("double", "score", required=False), "distribution": ColSpec(Array("double"), "distribution", required=False),
        "top_semantic": ColSpec(Array("string"), "top_semantic", required=False),
        "top_attribute": ColSpec(Array("string"), "top_attribute", required=False),
        "error": ColSpec("string", "error", required=False),
    }
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec(AnyType(), "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([specs[c] for c in columns]), params=ParamSchema(params) if params else None)


def signature():
    """The TMCR model's signature (``_signature``): score, distribution, top tags, error; param ``top_k``."""
    from mlflow.types.schema import ParamSpec

    return _signature(AESTHETICS_COLUMNS, [ParamSpec("top_k", "long", 3)])


def family_signature():
    """An image-family model's signature (``_signature``): score, distribution, error; no params."""
    return _signature(FAMILY_COLUMNS)


def promote(name: str, version: str, metric: str, value: float, higher_is_better: bool = True) -> str:
    """Make ``version`` the champion if it beats the current one on ``metric``, else the challenger.

    Kept for its callers; the rule lives in ``pipelines.tracking.registry.promote``.
    """
    from pipelines.tracking.registry import promote as _promote

    return _promote(name, version, metric, value, higher_is_better)
