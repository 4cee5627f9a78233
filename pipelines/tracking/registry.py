"""The MLflow model registry: version tags, the champion / challenger aliases, and look-ups.

Every registered version carries, as tags:
- its metrics (``metric.<name>``), and the validation metric it competes on under its own name
  (``val_srcc``) so the promotion rule reads one tag;
- ``dataset`` (params ``data.name``), ``embedding_model`` and ``clip_weights`` (the CLIP model
  and weights its features came from), ``random_weights``.

Promotion rule (``promote``): a new version becomes ``champion`` only when its validation
metric beats the current champion's (strictly; a tie keeps the champion), otherwise it becomes
``challenger``. ``promote_challenger`` re-applies the rule to the current challenger, e.g.
after re-scoring it. A champion must carry the metric to be compared: one without it (logged
before this rule) is replaced.

A version also carries ``model_sha256``, a digest of what it scores with (``model_digest``): a
rerun of ``evaluate`` whose scoring model is unchanged (e.g. only a plot setting changed) finds
that version (``find_version``) and registers no new one.

Any ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` resolves (``resolve``) and loads
(``load``: models logged from code only).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.io import DataError

CHAMPION, CHALLENGER = "champion", "challenger"
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def version_tags(*, metrics: dict[str, float], dataset: str, card: dict | None = None) -> dict[str, str]:
    """The tags a registered version carries (see the module docstring)."""
    tags = {f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items() if _number(v)}
    tags["dataset"] = str(dataset)
    if card is not None:
        tags["embedding_model"] = str(card.get("model"))
        tags["clip_weights"] = str(card.get("weights"))
        tags["random_weights"] = str(bool(card.get("random_weights"))).lower()
    return tags


def tag_version(name: str, version: str, tags: dict[str, str], client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def beats(value: float, best: float | None, higher_is_better: bool = True) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def promote(name: str, version: str, metric: str, value: float, higher_is_better: bool = True,
            client: MlflowClient | None = None) -> str:
    """Make ``version`` the champion if it beats the current one on ``metric``, else the challenger.

    Returns the alias given. The metric is stored on the version (tag ``metric``) first.
    """
    client = client or MlflowClient()
    version = str(version)
    if not _number(value):
        raise ValueError(f"{name} v{version}: {metric} = {value!r} is not a finite number; cannot rank it")
    client.set_model_version_tag(name, version, metric, repr(float(value)))
    champion = _alias_version(client, name, CHAMPION)
    best = None
    if champion is not None and str(champion.version) != version:
        raw = champion.tags.get(metric)
        best = float(raw) if raw is not None else None
    if champion is not None and str(champion.version) == version:
        return CHAMPION
    if beats(float(value), best, higher_is_better):
        client.set_registered_model_alias(name, CHAMPION, version)
        if champion is not None:
            client.set_model_version_tag(name, str(champion.version), "replaced_by", version)
        challenger = _alias_version(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        return CHAMPION
    client.set_registered_model_alias(name, CHALLENGER, version)
    return CHALLENGER


def promote_challenger(name: str, metric: str, higher_is_better: bool = True, client: MlflowClient | None = None) -> str | None:
    """Re-apply the rule to the current challenger: returns its alias afterwards, None if there is none."""
    client = client or MlflowClient()
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        return None
    raw = challenger.tags.get(metric)
    if raw is None:
        raise DataError(f"models:/{name}@{CHALLENGER} (v{challenger.version}) has no '{metric}' tag to compare on.")
    return promote(name, str(challenger.version), metric, float(raw), higher_is_better, client)


def tag_and_promote(name: str, version: str, *, metrics: dict[str, Any], dataset: str, card: dict | None = None,
                    extra: dict[str, str] | None = None, metric: str = "val_srcc", higher_is_better: bool = True,
                    client: MlflowClient | None = None) -> str | None:
    """Tag a registered version (``version_tags`` plus ``extra``), then apply the promotion rule on
    ``metrics[metric]``. Returns the alias given, or None when that metric is missing or not
    finite (e.g. too few validation images to rank the version): it stays registered, unranked.
    """
    client = client or MlflowClient()
    tag_version(name, version, {**version_tags(metrics=metrics, dataset=dataset, card=card), **(extra or {})}, client)
    value = metrics.get(metric)
    if not _number(value):
        return None
    return promote(name, version, metric, float(value), higher_is_better, client)


def register(model_uri: str, name: str, *, metrics: dict[str, float], dataset: str, card: dict | None,
             metric: str, higher_is_better: bool = True) -> tuple[str, str]:
    """Register ``model_uri`` (e.g. ``runs:/ID/model``) with its tags, then apply the promotion rule.

    Returns (version, alias).
    """
    if metric not in metrics:
        raise ValueError(f"metrics lack the promotion metric {metric!r}: {sorted(metrics)}")
    mv = mlflow.register_model(model_uri, name)
    alias = tag_and_promote(name, str(mv.version), metrics=metrics, dataset=dataset, card=card, metric=metric,
                            higher_is_better=higher_is_better)
    if alias is None:
        raise ValueError(f"{name} v{mv.version}: {metric} = {metrics[metric]!r} is not a finite number; cannot rank it")
    return str(mv.version), alias


# ---- one version per scoring model: reruns with the same model register nothing new

DIGEST_TAG = "model_sha256"


def model_digest(obj: Any, *files: str | Path) -> str:
    """A SHA-256 of a model's content: ``obj`` (nested dicts / lists of tensors, arrays, numbers,
    strings, e.g. a loaded bundle) taken value by value, so two ``torch.save`` files of equal
    content agree, plus the bytes of ``files`` (e.g. the code the served model runs)."""
    import hashlib

    h = hashlib.sha256()
    _feed(h, obj)
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    import numpy as np
    import torch

    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(str(k)).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: as 1-d
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def find_version(name: str, digest: str, client: MlflowClient | None = None):
    """The newest version of ``name`` tagged with ``digest`` (None when there is none)."""
    client = client or MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if (v.tags or {}).get(DIGEST_TAG) == digest]
    return max(same, key=lambda v: int(v.version)) if same else None


def scoring_digest(bundle: str | Path, card: dict, requirements: list[str]) -> str:
    """``model_digest`` of a TMCR scoring model: the bundle's content, the CLIP card, the pinned
    requirements and the code the served model runs."""
    from pipelines.io import load_torch

    here = Path(__file__).parent
    return model_digest([load_torch(bundle), card, list(requirements)], here / "scoring.py", here / "served_model.py")


def register_unless_known(name: str, digest: str, log_model, **tag_kwargs) -> tuple[str, str | None]:
    """The version of ``name`` tagged ``digest`` and its alias when one exists (nothing is logged);
    else ``log_model()`` (which registers a new version), tagged with ``digest`` and promoted by
    ``tag_and_promote(**tag_kwargs)``. Returns (version, alias)."""
    same = find_version(name, digest)
    if same is not None:  # (search results carry no aliases: read the version itself)
        aliases = MlflowClient().get_model_version(name, str(same.version)).aliases or []
        return str(same.version), (sorted(aliases) or [None])[0]
    version = str(log_model().registered_model_version)
    extra = {**(tag_kwargs.pop("extra", None) or {}), DIGEST_TAG: digest}
    return version, tag_and_promote(name, version, extra=extra, **tag_kwargs)


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    m = URI.match(uri.strip())
    if not m:
        raise DataError(f"{uri!r} is not a registry URI; use models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION.")
    return m["name"], m["alias"], m["version"]


def resolve(uri: str, client: MlflowClient | None = None):
    """The ModelVersion a registry URI names (DataError naming what exists when it does not)."""
    client = client or MlflowClient()
    name, alias, version = parse_uri(uri)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        try:
            rm = client.get_registered_model(name)
            known = f"aliases: {sorted(rm.aliases)}" if getattr(rm, "aliases", None) else "no aliases"
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            hint = f"{known}; versions: {versions}"
        except MlflowException:
            hint = "no registered model of that name"
        raise DataError(f"{uri}: not found in the registry at {mlflow.get_registry_uri()} ({hint}).") from exc


def load(uri: str, path_root: str | None = None):
    """Load a registry URI as a pyfunc model (resolving it first, for a clear error).

    Only models logged from code load (``pipelines.tracking.scoring``): a version whose pyfunc
    is a pickled Python object is refused (DataError), since unpickling it could run code.
    ``path_root``: the folder whose files ``path`` inputs may name (None: bytes inputs only).
    """
    import mlflow.pyfunc
    from mlflow.models import get_model_info

    resolve(uri)
    flavor = get_model_info(uri).flavors.get("python_function", {})
    if "model_code_path" not in flavor:
        raise DataError(f"{uri}: its pyfunc model is a pickled Python object, not logged from code, so it is not "
                        "loaded (unpickling could run code); register it again with this pipeline (`dvc repro`).")
    return mlflow.pyfunc.load_model(uri, model_config={"path_root": str(path_root)} if path_root is not None else None)
