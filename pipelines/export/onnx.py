"""Write a registered scoring model's whole scoring graph to one ONNX file.

``export_model(source, out_path)``: ``source`` is an MLflow model (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/ID/model``, or a local model folder with its ``MLmodel``), or
the scoring file itself (a TMCR ``bundle.pt`` or a family ``family.pt``).

The graph takes a batch of preprocessed images as uint8 NHWC pixels (what PIL gives after the
resize and crop) and computes in float32 everything after that:

- TMCR: ``/255``, CLIP normalisation, the CLIP image tower (fp32: the reference numerics of
  ``embed.precision: fp32``), L2 normalisation, tag matching with the tag matrix inside
  (``scale * E @ [T_sem | T_attr].T``), the head (E_CR + MLP) and the softmax. Outputs:
  ``probs`` (N x levels) and ``tm`` (N x (M + A), for the top tags).
- family (``aesaf`` / ``mnet``): ``/255``, ImageNet normalisation, the network, its ``probs``.

The ONNX file's metadata (``iaa`` key, JSON) holds what the ONNX Runtime scorer
(``pipelines.export.ort``) needs to preprocess and report without torch: the kind, the
resize / crop spec, the tag names, the number of levels.

``quantize="int8"`` additionally quantises every MatMul / Gemm weight to int8 with ONNX
Runtime's dynamic quantisation (activations scaled per call), like ``embed.precision: int8``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.io import DataError, atomic_path

OPSET = 17
META_KEY = "iaa"
FORMAT_VERSION = 1
QUANTIZE = (None, "int8")


class TMCRGraph(nn.Module):
    """uint8 NHWC pixels -> (probs, tm): the TMCR scoring model as one module."""

    def __init__(self, visual: nn.Module, head: nn.Module, tag_weight: torch.Tensor, scale: float,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.visual, self.head = visual, head
        self.register_buffer("tags", tag_weight.clone())  # D x (M + A)
        self.scale = float(scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255
        x = (x - self.mean) / self.std
        emb = F.normalize(self.visual(x).float(), dim=-1)
        tm = emb @ self.tags
        if self.scale != 1.0:
            tm = tm * self.scale
        return torch.softmax(self.head(tm, emb), dim=1), tm


class FamilyGraph(nn.Module):
    """uint8 NHWC pixels -> probs: an image-family model with its ImageNet normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from pipelines.images import MEAN, STD

        self.model = model
        self.register_buffer("mean", MEAN.reshape(1, 3, 1, 1).clone().float())
        self.register_buffer("std", STD.reshape(1, 3, 1, 1).clone().float())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.model((x - self.mean) / self.std)["probs"].float()


def _scoring_file(source: str | Path) -> tuple[str, Path, dict[str, str]]:
    """(kind, file, artifacts) of ``source``: kind ``tmcr`` (bundle) or ``family``."""
    src = str(source)
    path = Path(src).expanduser()
    if "://" not in src and not src.startswith(("models:/", "runs:/")):
        if not path.exists():
            raise DataError(f"export source {src!r}: no such file or folder; give a registry URI (models:/NAME@champion), "
                            "a runs:/ URI, a downloaded MLflow model folder, or a bundle.pt / family.pt file.")
        if path.is_file():
            return _kind_of_file(path), path, {}
        local = path
    else:
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(src))
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a bad URI
            raise DataError(f"export source {src!r}: cannot download it ({type(exc).__name__}: {exc}); check the URI "
                            "and MLFLOW_TRACKING_URI.") from None
    if not (local / "MLmodel").is_file():
        raise DataError(f"export source {src!r}: {local} has no MLmodel file, so it is not an MLflow model folder; "
                        "give the model folder, or the bundle.pt / family.pt file.")
    from mlflow.models import Model

    pyfunc = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    artifacts = {k: str(local / v["path"]) if isinstance(v, dict) else str(local / v)
                 for k, v in (pyfunc.get("artifacts") or {}).items()}
    if "bundle" in artifacts:
        return "tmcr", Path(artifacts["bundle"]), artifacts
    if "family" in artifacts:
        return "family", Path(artifacts["family"]), artifacts
    raise DataError(f"export source {src!r}: not a scoring model of this pipeline (its artifacts are "
                    f"{sorted(artifacts) or 'none'}; expected 'bundle' (TMCR) or 'family'). Export a model "
                    "registered by the evaluate or family stage.")


def _kind_of_file(path: Path) -> str:
    from pipelines.io import load_torch

    state = load_torch(path)
    if isinstance(state, dict) and {"arch", "model", "tag_emb", "card"} <= set(state):
        return "tmcr"
    if isinstance(state, dict) and {"arch", "model"} <= set(state) and isinstance(state["arch"], dict) and "family" in state["arch"]:
        return "family"
    raise DataError(f"export source {path}: neither a TMCR scoring bundle (bundle.pt: arch, model, tag_emb, card) nor "
                    "a family model state (family.pt: arch with 'family', model); give one of those files or a "
                    "registered model.")


def _clip_spec(preprocess) -> dict[str, Any]:
    """The PIL stage + normalisation of an open_clip preprocess, as the ONNX scorer replays it."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    steps = list(preprocess.transforms) if isinstance(preprocess, Compose) else []
    kinds = [type(s).__name__ for s in steps]
    ok = (len(steps) >= 4 and isinstance(steps[0], Resize) and isinstance(steps[1], CenterCrop)
          and isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize)
          and all(type(s).__name__ in ("MaybeConvertMode", "_convert_to_rgb", "function") for s in steps[2:-2]))
    size = steps[0].size if ok else None
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    if not ok or not isinstance(size, int) or steps[0].max_size is not None or steps[0].interpolation != InterpolationMode.BICUBIC:
        raise DataError(f"this CLIP model's preprocessing ({kinds}) is not the Resize(short side, bicubic) + CenterCrop + "
                        "Normalize that the ONNX scorer replays; score it with the MLflow model instead.")
    crop = steps[1].size
    crop = (int(crop), int(crop)) if isinstance(crop, int) else (int(crop[0]), int(crop[-1]))
    return {"resize": "short_side", "size": int(size), "interpolation": "bicubic", "crop": list(crop),
            "mean": [float(v) for v in steps[-1].mean], "std": [float(v) for v in steps[-1].std]}


def _tmcr_graph(bundle_path: Path, artifacts: dict[str, str]) -> tuple[nn.Module, dict[str, Any]]:
    from pipelines.embed.clip import load_clip
    from pipelines.heads.build import head_from_arch
    from pipelines.io import load_torch
    from pipelines.semantics.match import TagMatcher
    from pipelines.tracking.scoring import drop_text_tower

    b = load_torch(bundle_path)
    if b.get("cr_encoder") is not None:
        raise DataError(f"{bundle_path}: its E_CR reads pixels through a separate image backbone, which the ONNX export "
                        "does not cover yet; export a model whose E_CR reads the CLIP embedding (ranking.cr_encoder: "
                        "embedding), or serve this one with the MLflow model.")
    card = b["card"]
    model_ref = artifacts.get("clip_config", card["model"])
    pretrained = artifacts.get("clip_checkpoint") or ("none" if card["random_weights"] else card["pretrained"])
    clip = load_clip(model_ref, pretrained, allow_random_fallback=False, seed=card["init_seed"])
    if clip.random_weights != bool(card["random_weights"]):
        raise DataError(f"{bundle_path}: CLIP weights differ from training ({clip.weights} vs {card['weights']}).")
    drop_text_tower(clip.model)
    head = head_from_arch(b["arch"])
    head.load_state_dict(b["model"])
    head.eval()
    kinds = [str(k) for k in b["kinds"]]
    matcher = TagMatcher(b["tag_emb"].numpy(), kinds, float(b["scale"]))
    spec = _clip_spec(clip.preprocess)
    graph = TMCRGraph(clip.model.visual, head, matcher.weight, matcher.scale, spec["mean"], spec["std"]).eval()
    tags = np.asarray(b["tags"])
    k = np.asarray(kinds)
    meta = {"kind": "tmcr", "preprocess": spec, "n_levels": int(b["arch"]["n_levels"]),
            "semantic": tags[k == "semantic"].tolist(), "attribute": tags[k == "attribute"].tolist(),
            "batch_size": int(b.get("batch_size", 64)), "clip": {"model": str(card["model"]), "weights": clip.weights},
            "torch_precision": str(b.get("precision", "fp32"))}
    return graph, meta


def _family_graph(state_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from pipelines.io import load_torch
    from pipelines.tracking.scoring import FAMILY_MODES, family_aspect, family_model

    state = load_torch(state_path)
    arch = state["arch"]
    aspect = family_aspect(arch)
    size = int(arch["image_size"])
    meta = {"kind": "family", "family": str(arch["family"]), "n_levels": int(arch["n_levels"]),
            "preprocess": {"resize": FAMILY_MODES[aspect], "size": size, "interpolation": "bilinear"}}
    return FamilyGraph(family_model(state)).eval(), meta


def export_model(source: str | Path, out_path: str | Path, *, overwrite: bool = False, quantize: str | None = None,
                 opset: int = OPSET) -> Path:
    """Write ``source``'s scoring graph to ``out_path`` (``.onnx``); returns the path written.

    ``overwrite``: replace an existing file (otherwise an existing ``out_path`` is refused).
    ``quantize``: None (fp32) or ``"int8"`` (dynamic int8 weights for MatMul / Gemm).
    The file is checked by ONNX Runtime on a sample batch against torch before it is moved
    into place (atomic write: nothing is left half-written on error).
    """
    out = Path(out_path).expanduser()
    if quantize not in QUANTIZE:
        raise DataError(f"export quantize = {quantize!r}; use one of {QUANTIZE}.")
    if out.suffix != ".onnx":
        raise DataError(f"export out_path = {str(out)!r}: name it *.onnx.")
    if out.exists() and not overwrite:
        raise DataError(f"export out_path = {str(out)!r} already exists; remove it, choose another path, or pass "
                        "overwrite=True (iaa export --overwrite).")
    if not out.parent.is_dir():
        raise DataError(f"export out_path = {str(out)!r}: the folder {out.parent} does not exist; create it first.")
    kind, path, artifacts = _scoring_file(source)
    graph, meta = _tmcr_graph(path, artifacts) if kind == "tmcr" else _family_graph(path)
    meta.update({"format": FORMAT_VERSION, "quantize": quantize or "none", "source": str(source)})
    pre = meta["preprocess"]
    if kind == "tmcr" or pre["resize"] == "resize":
        h, w = pre.get("crop") or (pre["size"], pre["size"])
        dynamic = {"pixels": {0: "batch"}}
    else:  # short side fixed, the long side follows the image: one image per run
        h, w = pre["size"], pre["size"] + pre["size"] // 2
        dynamic = {"pixels": {0: "batch", 1: "height", 2: "width"}}
    sample = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8))
    names = ["probs", "tm"] if kind == "tmcr" else ["probs"]
    dynamic.update({n: {0: "batch"} for n in names})
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "graph.onnx"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused CPU kernel has no ONNX form
        try:
            with torch.no_grad():
                torch.onnx.export(graph, (sample,), str(raw), input_names=["pixels"], output_names=names,
                                  dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds for an unsupported op
            what = f"family {meta.get('family')} ({pre['resize']})" if kind == "family" else "TMCR"
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DataError(f"export source {str(source)!r}: the {what} graph cannot be written to ONNX ({first}); "
                            "serve it with the MLflow model instead.") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q = Path(tmp) / "graph.int8.onnx"
            quantize_dynamic(str(raw), str(q), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
            raw = q
        import onnx

        model = onnx.load(str(raw))
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        onnx.checker.check_model(model)
        _check_against_torch(model, graph, sample, names, loose=quantize is not None)
        with atomic_path(out) as target:
            onnx.save(model, str(target))
    return out


def _check_against_torch(model, graph: nn.Module, sample: torch.Tensor, names: list[str], loose: bool) -> None:
    """ONNX Runtime on the sample batch must give torch's probabilities (1e-4; int8: 0.05)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["probs"], {"pixels": sample.numpy()})[0]
    with torch.no_grad():
        out = graph(sample)
    want = (out[0] if isinstance(out, tuple) else out).numpy()
    diff = float(np.abs(got - want).max())
    if not np.isfinite(diff) or diff > (0.05 if loose else 1e-4):
        raise DataError(f"the exported graph's probabilities differ from torch's by {diff:.3g} on a sample batch; "
                        "not written (report this model's architecture).")

