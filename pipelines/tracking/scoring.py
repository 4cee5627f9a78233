"""MLflow pyfunc models that score images end to end, and their registration.

``AestheticsModel`` (the TMCR path, ``stages/evaluate.py``): the bundle holds what inference
needs: the CLIP model reference (name + weights: hub tag, bundled checkpoint, or the seed of a
random init), the tag libraries with their text embeddings, and the trained head (which
contains E_CR). Output: score, distribution, top tags.

``FamilyModel`` (the image families, ``stages/family.py``): the saved family state
(``models/family.pt``: ``arch``, ``model``, ``config``), rebuilt with
``pipelines.models.image_loop.model_from_state`` and fed pixels preprocessed exactly as the
training-time ``predict`` does. Output: score, distribution.

Both take a DataFrame with a ``path`` column (or ``image`` bytes, or base64 text; one reader,
``read_row_image``); an unreadable image gives a per-row ``error``, never a crash.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

BUNDLE = "bundle.pt"
AESTHETICS_COLUMNS = ["score", "distribution", "top_semantic", "top_attribute", "error"]  # AestheticsModel output
FAMILY_COLUMNS = ["score", "distribution", "error"]  # FamilyModel output


def make_bundle(path: Path, *, head_state: dict, card: dict, tags: list[str], kinds: list[str], tag_emb: np.ndarray, logit_scale: float,
                cr_encoder: dict | None = None) -> None:
    """``cr_encoder``: the image E_CR's spec + backbone weights (``pipelines.ranking.cr_features.bundle_cr_encoder``),
    whose features are the head's CR input; None when E_CR reads the CLIP embedding."""
    from pipelines.io import atomic_path

    bundle = {
        "arch": head_state["arch"], "model": head_state["model"], "card": card,
        "tags": list(tags), "kinds": list(kinds), "tag_emb": np.asarray(tag_emb, np.float32), "scale": float(logit_scale),
        "cr_encoder": cr_encoder,
    }
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)


def read_row_image(row: pd.Series):
    """The RGB PIL image of one input row: ``image`` bytes, ``image`` base64 text, else ``path``."""
    from PIL import Image

    img = row.get("image")
    if isinstance(img, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(img))).convert("RGB")
    if isinstance(img, str) and img:  # base64 text (JSON clients without a binary signature)
        import base64
        import binascii

        try:
            data = base64.b64decode(img, validate=True)
        except binascii.Error as exc:
            raise ValueError("'image' is a string but not base64-encoded image bytes") from exc
        return Image.open(io.BytesIO(data)).convert("RGB")
    path = row.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("row has neither image bytes nor a path")
    return Image.open(path).convert("RGB")


def check_input(model_input: pd.DataFrame) -> None:
    if not {"path", "image"} & set(model_input.columns):
        raise ValueError("input needs a 'path' column (image file paths) or an 'image' column (bytes)")


def error_row(exc: Exception) -> dict[str, Any]:
    """The output of a row whose image could not be read (the batch goes on)."""
    return {"score": np.nan, "distribution": None, "error": f"{type(exc).__name__}: {exc}"}


def score_row(probs: np.ndarray) -> dict[str, Any]:
    """Score (mean level, 1..L) and distribution of one predicted distribution."""
    probs = np.asarray(probs, dtype=np.float64)
    return {"score": float((probs * np.arange(1, len(probs) + 1)).sum()), "distribution": probs.tolist(), "error": None}


class AestheticsModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.embed.clip import load_clip
        from pipelines.train.loops import head_from_arch

        b = torch.load(context.artifacts["bundle"], map_location="cpu", weights_only=False)
        card = b["card"]
        model_ref = context.artifacts.get("clip_config", card["model"])
        pretrained = context.artifacts.get("clip_checkpoint")
        if pretrained is None:
            pretrained = "none" if card["random_weights"] else card["pretrained"]
        self.clip = load_clip(model_ref, pretrained, allow_random_fallback=False, seed=card["init_seed"])
        if self.clip.random_weights != bool(card["random_weights"]):
            raise RuntimeError(f"CLIP weights differ from training: {self.clip.weights} vs {card['weights']}")
        self.head = head_from_arch(b["arch"])
        self.head.load_state_dict(b["model"])
        self.head.eval()
        from pipelines.ranking.cr_features import cr_backbone_from_bundle

        self.cr_backbone = cr_backbone_from_bundle(b.get("cr_encoder"))  # image E_CR: CR input from pixels
        self.tags, self.kinds = np.asarray(b["tags"]), np.asarray(b["kinds"])
        self.tag_emb, self.scale, self.card = torch.from_numpy(b["tag_emb"]), b["scale"], card

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipelines.ranking.cr_features import cr_image_features

        check_input(model_input)
        top_k = int((params or {}).get("top_k", 3))
        rows = []
        for _, row in model_input.iterrows():
            try:
                image = read_row_image(row)
                x = self.clip.preprocess(image).unsqueeze(0)
            except Exception as exc:  # noqa: BLE001 - per-row error: one bad image must not sink the batch
                rows.append({**error_row(exc), "top_semantic": None, "top_attribute": None})
                continue
            emb = self.clip.model.encode_image(x).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            sims = (emb @ self.tag_emb.T) * self.scale
            cr_in = emb if self.cr_backbone is None else cr_image_features(self.cr_backbone, [image])
            probs = torch.softmax(self.head(sims, cr_in), 1)[0].numpy()
            s = sims[0].numpy()
            top = {k: self.tags[self.kinds == k][np.argsort(-s[self.kinds == k])[:top_k]].tolist() for k in ("semantic", "attribute")}
            rows.append({**score_row(probs), "top_semantic": top["semantic"], "top_attribute": top["attribute"]})
        return pd.DataFrame(rows, columns=AESTHETICS_COLUMNS)


class FamilyModel(mlflow.pyfunc.PythonModel):
    """An image-family model (``stages/family.py``) as a pyfunc: artifact ``family`` = the saved state.

    Each image is preprocessed like the training-time ``predict``: resized to ``image_size``
    squared (``aspect: square``; batched), or short side ``image_size`` with the aspect ratio
    kept (``aspect: keep``; one image per forward pass, unpadded), then normalised.
    """

    batch_size = 32

    def load_context(self, context) -> None:
        from pipelines.models.image_loop import (
            arch_aspect,
            model_from_state,
            predict_mode,
        )

        state = torch.load(context.artifacts["family"], map_location="cpu", weights_only=False)
        self.model = model_from_state(state)
        arch = state["arch"]
        self.family, self.size, self.aspect = arch["family"], int(arch["image_size"]), arch_aspect(arch)
        self.mode = predict_mode(self.aspect)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipelines.models.image_loop import image_tensor, normalise

        check_input(model_input)
        rows: list[dict | None] = []
        for start in range(0, len(model_input), self.batch_size):  # read and score batch by batch
            ready: list[tuple[int, torch.Tensor]] = []
            for _, row in model_input.iloc[start : start + self.batch_size].iterrows():
                try:
                    ready.append((len(rows), normalise(image_tensor(read_row_image(row), (self.size, self.size), self.mode))))
                    rows.append(None)
                except Exception as exc:  # noqa: BLE001 - per-row error: one bad image must not sink the batch
                    rows.append(error_row(exc))
            step = self.batch_size if self.aspect == "square" else 1  # keep: sizes differ, no padding
            for j in range(0, len(ready), step):
                chunk = ready[j : j + step]
                probs = self.model(torch.stack([x for _, x in chunk]))["probs"].float().numpy()
                for (i, _), p in zip(chunk, probs, strict=True):
                    rows[i] = score_row(p)
        return pd.DataFrame(rows, columns=FAMILY_COLUMNS)


def log_scoring_model(bundle_path: Path, card: dict, *, registered_name: str | None, pip_requirements: list[str]) -> Any:
    """Log the TMCR pyfunc model in the active run (and register it when a name is given)."""
    artifacts = {"bundle": str(bundle_path)}
    if str(card["model"]).endswith(".json"):
        artifacts["clip_config"] = str(Path(card["model"]).resolve())
    if str(card["weights"]).startswith("checkpoint:"):
        artifacts["clip_checkpoint"] = str(Path(card["weights"].split(":", 1)[1]).resolve())
    return _log_model(AestheticsModel(), artifacts, signature(), registered_name, pip_requirements)


def log_family_model(state_path: Path, *, registered_name: str | None, pip_requirements: list[str]) -> Any:
    """Log an image-family pyfunc model (``FamilyModel``) in the active run (and register it when a name is given)."""
    return _log_model(FamilyModel(), {"family": str(state_path)}, family_signature(), registered_name, pip_requirements)


def _log_model(python_model, artifacts: dict[str, str], sig, registered_name: str | None, pip_requirements: list[str]) -> Any:
    import pipelines

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=python_model,
        artifacts=artifacts,
        signature=sig,
        code_paths=[str(Path(pipelines.__file__).parent)],
        registered_model_name=registered_name,
        pip_requirements=pip_requirements,
    )


def requirements(packages: tuple[str, ...] = ("torch", "torchvision", "numpy", "pandas", "pillow", "mlflow")) -> list[str]:
    """Pinned pip requirements (the installed versions) for a logged model."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in packages]


def _signature(columns: list[str], params: list | None = None):
    """Inputs: ``path`` (string) and/or ``image`` (bytes; base64 in JSON); outputs ``columns``.

    Both input columns are optional, so a request may carry either. With ``image`` typed binary,
    ``mlflow models serve`` decodes base64 strings in JSON requests into bytes.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, Schema

    specs = {
        "score": ColSpec("double", "score"), "distribution": ColSpec(Array("double"), "distribution", required=False),
        "top_semantic": ColSpec(Array("string"), "top_semantic", required=False),
        "top_attribute": ColSpec(Array("string"), "top_attribute", required=False),
        "error": ColSpec("string", "error", required=False),
    }
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
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
