"""An MLflow pyfunc model that scores images end to end, and its registration.

The bundle holds what inference needs: the CLIP model reference (name + weights: hub tag,
bundled checkpoint, or the seed of a random init), the tag libraries with their text
embeddings, and the trained head (which contains E_CR). ``predict`` takes a DataFrame
with a ``path`` column (or ``image`` bytes) and returns score, distribution and top tags;
an unreadable image gives a per-row error, never a crash.
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


def make_bundle(path: Path, *, head_state: dict, card: dict, tags: list[str], kinds: list[str], tag_emb: np.ndarray, logit_scale: float) -> None:
    from pipelines.io import atomic_path

    bundle = {
        "arch": head_state["arch"], "model": head_state["model"], "card": card,
        "tags": list(tags), "kinds": list(kinds), "tag_emb": np.asarray(tag_emb, np.float32), "scale": float(logit_scale),
    }
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)


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
        self.tags, self.kinds = np.asarray(b["tags"]), np.asarray(b["kinds"])
        self.tag_emb, self.scale, self.card = torch.from_numpy(b["tag_emb"]), b["scale"], card

    def _image(self, row: pd.Series):
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

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not {"path", "image"} & set(model_input.columns):
            raise ValueError("input needs a 'path' column (image file paths) or an 'image' column (bytes)")
        top_k = int((params or {}).get("top_k", 3))
        rows = []
        for _, row in model_input.iterrows():
            try:
                x = self.clip.preprocess(self._image(row)).unsqueeze(0)
            except Exception as exc:  # per-row error: one bad image must not sink the batch
                rows.append({"score": np.nan, "distribution": None, "top_semantic": None, "top_attribute": None, "error": f"{type(exc).__name__}: {exc}"})
                continue
            emb = self.clip.model.encode_image(x).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            sims = (emb @ self.tag_emb.T) * self.scale
            probs = torch.softmax(self.head(sims, emb), 1)[0].numpy()
            s = sims[0].numpy()
            top = {k: self.tags[self.kinds == k][np.argsort(-s[self.kinds == k])[:top_k]].tolist() for k in ("semantic", "attribute")}
            rows.append({
                "score": float((probs * np.arange(1, len(probs) + 1)).sum()), "distribution": probs.tolist(),
                "top_semantic": top["semantic"], "top_attribute": top["attribute"], "error": None,
            })
        return pd.DataFrame(rows)


def log_scoring_model(bundle_path: Path, card: dict, *, registered_name: str | None, pip_requirements: list[str]) -> Any:
    """Log the pyfunc model in the active run (and register it when a name is given)."""
    import pipelines

    artifacts = {"bundle": str(bundle_path)}
    if str(card["model"]).endswith(".json"):
        artifacts["clip_config"] = str(Path(card["model"]).resolve())
    if str(card["weights"]).startswith("checkpoint:"):
        artifacts["clip_checkpoint"] = str(Path(card["weights"].split(":", 1)[1]).resolve())
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=AestheticsModel(),
        artifacts=artifacts,
        signature=signature(),
        code_paths=[str(Path(pipelines.__file__).parent)],
        registered_model_name=registered_name,
        pip_requirements=pip_requirements,
    )


def signature():
    """Inputs: ``path`` (string) and/or ``image`` (bytes; base64 in JSON); param ``top_k``.

    Both columns are optional, so a request may carry either. With ``image`` typed binary,
    ``mlflow models serve`` decodes base64 strings in JSON requests into bytes.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema([
        ColSpec("double", "score"), ColSpec(Array("double"), "distribution", required=False),
        ColSpec(Array("string"), "top_semantic", required=False), ColSpec(Array("string"), "top_attribute", required=False),
        ColSpec("string", "error", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("top_k", "long", 3)]))


def promote(name: str, version: str, metric: str, value: float, higher_is_better: bool = True) -> str:
    """Make ``version`` the champion if it beats the current one on ``metric``, else the challenger.

    Kept for its callers; the rule lives in ``pipelines.tracking.registry.promote``.
    """
    from pipelines.tracking.registry import promote as _promote

    return _promote(name, version, metric, value, higher_is_better)
