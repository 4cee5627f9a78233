"""A small, fully reproducible demo data set built from photographs shipped with scikit-image.

Each base photograph is a semantic *subject* ("cat", "rocket launch", ...) with its own base
aesthetic quality. Many images per subject come from varied crops, flips and scales; graded
photographic faults (blur, under/over-exposure, noise, tilt, bad crop, colour cast, JPEG
artefacts) lower a latent score on 1..10, and ``n_voters`` simulated votes around it give
AVA-style 10-level vote counts with a long-tailed mean-score distribution.

Files written under ``out_dir`` (each atomically; ``summary.json`` last):

- ``images/<image_id>.jpg``  -- ``image_size`` x ``image_size`` RGB JPEGs
- ``labels.csv``             -- ``image_id,split,v1..v10`` (empty votes on unlabeled rows);
                                read it with the ``votes_csv`` adapter
- ``comments.jsonl``         -- ``{"image_id", "comment"}`` per line: templated critiques that
                                name the subject and the image's real faults / strengths
- ``meta.csv``               -- ground truth: subject, tier, faults with severities, latent
                                score and the votes of every image (unlabeled ones included)
- ``summary.json``           -- the configuration and counts, score histogram by level
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from pipelines.io import atomic_path, write_json, write_text

N_LEVELS = 10
JPEG_QUALITY = 90
DEFAULT_SPLITS: Mapping[str, float] = {"train": 0.5, "val": 0.15, "test": 0.2, "unlabeled": 0.15}

FAULTS: tuple[str, ...] = (
    "blur", "underexposure", "overexposure", "noise", "tilt", "bad_crop", "colour_cast", "jpeg",
)
"""Photographic faults, each applied with a severity in (0, 1]."""

FAULT_PENALTY: dict[str, float] = {
    "blur": 1.3, "underexposure": 1.1, "overexposure": 1.2, "noise": 0.9,
    "tilt": 0.65, "bad_crop": 0.85, "colour_cast": 0.7, "jpeg": 0.85,
}
"""Latent-score penalty of each fault at severity 1 (scaled linearly by severity)."""

Tier = tuple[str, float, int, float, tuple[float, float]]
"""(name, share of images, number of faults, score bonus, Beta(a, b) of fault severities)."""

TIERS: tuple[Tier, ...] = (
    ("pristine", 0.07, 0, 1.6, (1.0, 1.0)),
    ("clean", 0.25, 0, 0.4, (1.0, 1.0)),
    ("one_fault", 0.38, 1, 0.0, (1.6, 3.0)),
    ("two_faults", 0.20, 2, 0.0, (2.0, 2.6)),
    ("three_faults", 0.10, 3, 0.0, (3.0, 1.6)),
)

CAST_TONES: dict[str, tuple[float, float, float]] = {
    "warm": (1.0, 0.15, -0.9), "cool": (-0.9, 0.05, 1.0),
    "green": (-0.5, 0.8, -0.5), "magenta": (0.7, -0.8, 0.6),
}


@dataclass(frozen=True)
class Subject:
    """A base photograph: its key in ``skimage.data``, a human name, and its base quality.

    ``praise`` are adjectives for the subject; ``number`` is "one", "many" (plural noun) or
    "mass" (uncountable noun), for grammatical critiques.
    """

    key: str
    name: str
    base_quality: float
    praise: tuple[str, ...] = ("interesting",)
    number: str = "one"


SUBJECTS: tuple[Subject, ...] = (
    Subject("chelsea", "cat", 6.54, ("lovely", "adorable", "full of character")),
    Subject("astronaut", "astronaut", 6.47, ("striking", "iconic", "heroic")),
    Subject("rocket", "rocket launch", 6.40, ("dramatic", "exciting", "thrilling")),
    Subject("coffee", "coffee cup", 6.26, ("inviting", "nicely styled", "appetising")),
    Subject("hubble_deep_field", "galaxies", 6.26, ("breathtaking", "mesmerising", "stunning"), "many"),
    Subject("stereo_motorcycle", "motorcycle", 6.12, ("handsome", "sleek", "gleaming")),
    Subject("camera", "cameraman", 6.05, ("classic", "timeless", "nicely posed")),
    Subject("moon", "moon", 5.91, ("serene", "atmospheric", "timeless")),
    Subject("coins", "coins", 5.56, ("interesting", "tactile", "shiny"), "many"),
    Subject("colorwheel", "colour wheel", 5.42, ("bold", "colourful", "graphic")),
    Subject("horse", "horse silhouette", 5.42, ("graphic", "elegant", "simple")),
    Subject("retina", "retina scan", 5.35, ("unusual", "curious", "scientific")),
    Subject("immunohistochemistry", "stained tissue", 5.28, ("unusual", "curious", "abstract"), "mass"),
    Subject("grass", "grass", 5.28, ("fresh", "simple", "calm"), "mass"),
    Subject("brick", "brick wall", 5.21, ("textured", "plain", "simple")),
    Subject("cell", "cells", 5.14, ("curious", "scientific", "abstract"), "many"),
    Subject("gravel", "gravel", 5.07, ("textured", "plain", "ordinary"), "mass"),
    Subject("text", "painted lettering", 5.07, ("readable", "plain", "graphic"), "mass"),
    Subject("page", "printed page", 4.93, ("plain", "readable", "ordinary")),
)
"""Photographs in the scikit-image wheel that load without a download (no pooch needed).

Left out: ``clock`` (motion-blurred on purpose, so a "clean" crop would look blurred),
synthetic images (``logo``, ``checkerboard``, ``binary_blobs``, ``shepp_logan_phantom``),
tiny ones (``lfw_subset``, ``microaneurysms``), and those needing pooch (``brain``, ``eagle``,
``lily``, ``kidney``, ``skin``, ...)."""


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render one demo image and score it."""

    image_id: str
    subject: Subject
    tier: str
    crop: tuple[float, float, float]  # centre offset y, x from the photo's centre, side; all in
    #                                   units of the photo's shorter side
    flip: bool
    faults: dict[str, float] = field(default_factory=dict)  # fault -> severity in (0, 1]
    tilt_sign: int = 1
    cast_tone: str = "warm"
    noise_seed: int = 0
    latent: float = 5.0
    vote_sd: float = 1.4


# ---------------------------------------------------------------------------- base photographs


@lru_cache(maxsize=None)
def load_photo(key: str) -> np.ndarray:
    """A base photograph from ``skimage.data`` as an ``H x W x 3`` uint8 RGB array."""
    import skimage.data

    img = getattr(skimage.data, key)()
    if key == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:  # the horse silhouette: dark horse on a pale, warm background
        img = np.where(img, 235, 40).astype(np.uint8)
        img = np.stack([img, (img * 0.95).astype(np.uint8), (img * 0.85).astype(np.uint8)], -1)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


# ------------------------------------------------------------------------------------ rendering


def render(spec: ImageSpec, size: int) -> np.ndarray:
    """Render ``spec`` from its base photograph: crop, flip, then the faults in camera order."""
    photo = load_photo(spec.subject.key)
    box = crop_box(spec.crop, *photo.shape[:2])
    img = Image.fromarray(photo).resize((size, size), Image.Resampling.LANCZOS, box=box)
    if spec.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    f = spec.faults
    if "tilt" in f:
        img = _tilt(img, spec.tilt_sign * (2.5 + 12.5 * f["tilt"]))
    if "blur" in f:
        img = img.filter(ImageFilter.GaussianBlur(radius=(0.7 + 3.8 * f["blur"]) * size / 224))
    x = np.asarray(img, dtype=np.float32) / 255.0
    if "underexposure" in f:
        sev = f["underexposure"]
        x = x ** (1.0 + 1.3 * sev) * (1.0 - 0.6 * sev)
    if "overexposure" in f:
        sev = f["overexposure"]
        x = (1.0 - (1.0 - x) ** (1.0 + 1.5 * sev)) * (1.0 + 0.45 * sev) + 0.06 * sev
    if "colour_cast" in f:
        gains = 1.0 + 0.35 * f["colour_cast"] * np.asarray(CAST_TONES[spec.cast_tone], np.float32)
        x = x * gains
    if "noise" in f:
        sigma = 0.025 + 0.16 * f["noise"]
        rng = np.random.default_rng(spec.noise_seed)
        luma = rng.standard_normal(x.shape[:2], dtype=np.float32)[..., None]
        chroma = rng.standard_normal(x.shape, dtype=np.float32)
        x = x + sigma * (0.8 * luma + 0.45 * chroma)
    out = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if "jpeg" in f:
        out = _jpeg_roundtrip(out, quality=int(round(40 - 36 * f["jpeg"])))
    return out


def crop_box(crop: tuple[float, float, float], h: int, w: int) -> tuple[float, float, float, float]:
    """Pixel box (left, top, right, bottom) of a square crop, shifted to stay inside the photo."""
    dy, dx, side = crop
    m = min(h, w)
    s = side * m
    y0 = float(np.clip(h / 2 + dy * m - s / 2, 0, h - s))
    x0 = float(np.clip(w / 2 + dx * m - s / 2, 0, w - s))
    return (x0, y0, x0 + s, y0 + s)


def _tilt(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate about the centre, then crop the largest upright square and scale it back."""
    size = img.size[0]
    rotated = img.rotate(degrees, resample=Image.Resampling.BICUBIC)
    rad = np.deg2rad(abs(degrees))
    inner = size / (np.cos(rad) + np.sin(rad))
    m = (size - inner) / 2
    return rotated.resize((size, size), Image.Resampling.BICUBIC, box=(m, m, m + inner, m + inner))


def _jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=max(quality, 2), subsampling=2)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


# --------------------------------------------------------------------------------- the plan


def plan_images(
    n_images: int, seed: int, splits: Mapping[str, float]
) -> tuple[list[ImageSpec], list[str]]:
    """Decide subject, tier, crop, faults and latent score of every image, and its split."""
    rng = np.random.default_rng([seed, 0])
    tier_counts = _apportion(n_images, [share for _, share, *_ in TIERS])
    tier_of = np.repeat(np.arange(len(TIERS)), tier_counts)
    rng.shuffle(tier_of)
    subject_of = np.arange(n_images) % len(SUBJECTS)
    rng.shuffle(subject_of)
    names = list(splits)
    split_of = np.repeat(np.arange(len(names)), _apportion(n_images, [splits[s] for s in names]))
    rng.shuffle(split_of)
    specs = [
        _plan_one(i, SUBJECTS[subject_of[i]], TIERS[tier_of[i]], np.random.default_rng([seed, 1, i]))
        for i in range(n_images)
    ]
    return specs, [names[k] for k in split_of]


def _plan_one(i: int, subject: Subject, tier: Tier, rng: np.random.Generator) -> ImageSpec:
    """Crop, faults (with severities) and latent score of image ``i``."""
    name, _, n_faults, bonus, (a, b) = tier
    pool = list(FAULTS)
    faults: dict[str, float] = {}
    for _ in range(n_faults):
        fault = pool[rng.integers(len(pool))]
        faults[fault] = round(float(0.08 + 0.92 * rng.beta(a, b)), 3)
        pool.remove(fault)
        if fault in ("underexposure", "overexposure"):
            pool = [p for p in pool if p not in ("underexposure", "overexposure")]
    if "bad_crop" in faults:  # tight crop pushed towards an edge: the centred subject is cut
        sev = faults["bad_crop"]
        side = 0.62 - 0.3 * sev + 0.05 * rng.random()
        angle = rng.uniform(0, 2 * np.pi)
        shift = 0.18 + 0.3 * sev
        dy, dx = shift * np.sin(angle), shift * np.cos(angle)
    else:
        side = rng.uniform(0.78, 0.95) if name == "pristine" else rng.uniform(0.6, 0.95)
        jitter = 0.02 if name == "pristine" else 0.05
        dy, dx = rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
    penalty = sum(FAULT_PENALTY[k] * v for k, v in faults.items())
    latent = subject.base_quality + bonus - penalty + rng.normal(0.0, 0.3)
    return ImageSpec(
        image_id=f"img{i:05d}",
        subject=subject,
        tier=name,
        crop=(round(float(dy), 4), round(float(dx), 4), round(float(side), 4)),
        flip=bool(rng.random() < 0.5),
        faults=faults,
        tilt_sign=int(rng.choice([-1, 1])),
        cast_tone=str(rng.choice(list(CAST_TONES))),
        noise_seed=int(rng.integers(2**31)),
        latent=round(float(np.clip(latent, 1.3, 9.6)), 4),
        vote_sd=round(float(rng.uniform(1.1, 1.75)), 4),
    )


def _apportion(n: int, shares: list[float]) -> np.ndarray:
    """Split ``n`` items by ``shares`` (largest remainder); every positive share gets >= 1."""
    shares_arr = np.asarray(shares, dtype=np.float64)
    exact = n * shares_arr / shares_arr.sum()
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    for k in np.flatnonzero((counts == 0) & (shares_arr > 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts


def draw_votes(latent: float, vote_sd: float, n_voters: int, rng: np.random.Generator) -> np.ndarray:
    """Vote counts on 1..10 from a discretised normal around ``latent``."""
    levels = np.arange(1, N_LEVELS + 1)
    p = np.exp(-0.5 * ((levels - latent) / vote_sd) ** 2)
    return rng.multinomial(n_voters, p / p.sum())


# ----------------------------------------------------------------------------------- comments

_SEVERITY = ("slightly", "noticeably", "badly")
_FAULT_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # (mild, moderate, severe) descriptions, each usable after "the shot is"
    "blur": (
        ("a little soft", "slightly out of focus"),
        ("blurry", "out of focus"),
        ("badly blurred", "completely out of focus"),
    ),
    "underexposure": (
        ("a bit dark", "slightly underexposed"),
        ("underexposed", "too dark"),
        ("badly underexposed", "far too dark"),
    ),
    "overexposure": (
        ("a touch bright", "slightly overexposed"),
        ("overexposed", "washed out"),
        ("badly overexposed", "blown out"),
    ),
    "noise": (
        ("a little grainy", "slightly noisy"),
        ("noisy", "grainy"),
        ("very noisy", "ruined by heavy grain"),
    ),
    "tilt": (
        ("slightly tilted", "leaning a little"),
        ("tilted", "crooked"),
        ("badly tilted", "leaning hard"),
    ),
    "bad_crop": (
        ("slightly off-centre", "a bit awkwardly framed"),
        ("awkwardly cropped", "off-centre"),
        ("badly cropped", "cutting off the subject"),
    ),
    "colour_cast": (
        ("slightly {tone}", "a little {tone} in tone"),
        ("{tone} from a colour cast", "off in colour"),
        ("drowned in a strong {tone} cast", "badly off in colour"),
    ),
    "jpeg": (
        ("showing slight compression", "a little blocky"),
        ("blocky with jpeg artefacts", "over-compressed"),
        ("full of heavy compression artefacts", "badly over-compressed"),
    ),
}
_FAULT_NOUNS: dict[str, str] = {
    "blur": "the blur", "underexposure": "the underexposure", "overexposure": "the overexposure",
    "noise": "the noise", "tilt": "the tilted horizon", "bad_crop": "the crop",
    "colour_cast": "the colour cast", "jpeg": "the compression artefacts",
}
_TONE_WORDS = {"warm": "orange", "cool": "blue", "green": "green", "magenta": "magenta"}
_STRENGTHS: dict[str, tuple[str, ...]] = {
    "blur": ("sharp details", "crisp focus", "tack-sharp focus"),
    "exposure": ("great exposure", "well-balanced exposure", "lovely light"),
    "noise": ("clean, noise-free tones", "smooth tones"),
    "tilt": ("a level horizon", "straight lines"),
    "bad_crop": ("nice composition", "well-framed composition", "good framing"),
    "colour_cast": ("natural colours", "accurate white balance"),
    "jpeg": ("clean detail", "a clean, high-quality file"),
}
_VERDICT = (
    (3.5, ("Not working for me, sorry.", "This one needs another try.", "Hard to enjoy as it is.")),
    (5.0, ("An average entry.", "Some potential here.", "Decent attempt.")),
    (6.3, ("A solid entry.", "Nice work overall.", "Good job.")),
    (99.0, ("One of the best in the challenge!", "Excellent shot, well done.", "Top marks from me.")),
)


def write_comments(spec: ImageSpec, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` photographer-style critiques naming the subject and its real faults or strengths."""
    subj = spec.subject.name
    many = spec.subject.number == "many"
    is_ = "are" if many else "is"
    this = "these" if many else "this"
    faults = sorted(spec.faults.items(), key=lambda kv: -kv[1])
    exposure_fault = bool({"underexposure", "overexposure"} & set(spec.faults))
    good_aspects = [
        a for a in _STRENGTHS
        if a not in spec.faults and not (a == "exposure" and exposure_fault)
    ]

    def pick(seq: Any) -> Any:
        return seq[int(rng.integers(len(seq)))]

    def a_(adjective: str) -> str:
        """'an iconic astronaut', 'breathtaking galaxies', 'fresh grass'."""
        if spec.subject.number != "one":
            return f"{adjective} {subj}"
        return f"{'an' if adjective[0] in 'aeiou' else 'a'} {adjective} {subj}"

    out = []
    for _ in range(n):
        praise = pick(spec.subject.praise)
        strengths = [pick(_STRENGTHS[a]) for a in rng.permutation(good_aspects)[:2]]
        verdict = pick(next(v for cut, v in _VERDICT if spec.latent < cut))
        if faults:
            k = 0 if len(faults) == 1 or rng.random() < 0.6 else int(rng.integers(len(faults)))
            fault, sev = faults[k]
            words = pick(_FAULT_WORDS[fault][min(int(sev * 3), 2)])
            words = words.format(tone=_TONE_WORDS[spec.cast_tone])
            templates = [
                f"The {subj} {is_} {praise} but the shot is {words}.",
                f"Nice idea with the {subj}, though the image is {words}.",
                f"Too bad about {_FAULT_NOUNS[fault]}: the {subj} deserved better. {verdict}",
                f"I like the {subj}, but the photo is {words}. {verdict}",
                f"{a_(praise).capitalize()} could have been great; sadly the photo is {words}.",
            ]
            if strengths:
                templates.append(
                    f"{strengths[0].capitalize()} on the {subj}, but the frame is {words}."
                )
            if len(faults) > 1:
                other = _FAULT_NOUNS[faults[(k + 1) % len(faults)][0]]
                templates.append(
                    f"This shot of the {subj} is {words}, and {other} does not help. {verdict}"
                )
        else:
            s1 = strengths[0] if strengths else "good technique"
            s2 = strengths[1] if len(strengths) > 1 else "good light"
            templates = [
                f"{s1.capitalize()} on the {subj}, {s2}.",
                f"{a_(praise).capitalize()} with {s1} and {s2}. {verdict}",
                f"Love {this} {subj}: {s1}, {s2}.",
                f"The {subj} {is_} {praise}; {s1} throughout. {verdict}",
            ]
        out.append(pick(templates))
    return out


# ----------------------------------------------------------------------------------- generate


def generate_demo(
    out_dir: str | os.PathLike,
    *,
    n_images: int = 360,
    image_size: int = 224,
    seed: int = 0,
    splits: Mapping[str, float] = DEFAULT_SPLITS,
    n_voters: int = 100,
    comments_per_image: int = 2,
    progress: bool = True,
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the demo data set into ``out_dir`` and return its summary (also ``summary.json``).

    Deterministic: the same arguments give byte-identical files. ``on_image(i)`` is called
    after each image is written (a hook for tests and progress reporting).
    """
    from pipelines.data.manifest import SPLITS

    bad = sorted(set(splits) - set(SPLITS))
    if bad or not splits or any(v < 0 for v in splits.values()) or sum(splits.values()) <= 0:
        raise ValueError(
            f"splits must map some of {SPLITS} to non-negative fractions, got {dict(splits)}"
        )
    n_used = sum(1 for v in splits.values() if v > 0)
    if n_images < max(n_used, 1):
        raise ValueError(f"n_images={n_images} is too small for {n_used} splits")
    if image_size < 16 or n_voters < 1 or comments_per_image < 0:
        raise ValueError("need image_size >= 16, n_voters >= 1, comments_per_image >= 0")

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    specs, split_of = plan_images(n_images, seed, splits)
    keep = {f"{s.image_id}.jpg" for s in specs}
    for stale in img_dir.glob("*.jpg"):  # images of an earlier, larger run
        if stale.name not in keep:
            stale.unlink()

    votes: list[np.ndarray] = []
    comments: list[str] = []
    for i, spec in enumerate(tqdm(specs, desc="demo images", unit="img", disable=not progress)):
        pixels = render(spec, image_size)
        with atomic_path(img_dir / f"{spec.image_id}.jpg") as tmp:
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        rng = np.random.default_rng([seed, 2, i])
        votes.append(draw_votes(spec.latent, spec.vote_sd, n_voters, rng))
        for text in write_comments(spec, rng, comments_per_image):
            comments.append(json.dumps({"image_id": spec.image_id, "comment": text}))
        if on_image is not None:
            on_image(i)

    level_names = [f"v{k}" for k in range(1, N_LEVELS + 1)]
    labels = _csv(["image_id", "split", *level_names], [
        [s.image_id, sp, *(["" for _ in v] if sp == "unlabeled" else v.tolist())]
        for s, sp, v in zip(specs, split_of, votes)
    ])
    meta = _csv(["image_id", "subject", "split", "tier", "faults", "latent", "votes"], [
        [s.image_id, s.subject.name, sp, s.tier,
         ";".join(f"{k}:{v:.3f}" for k, v in sorted(s.faults.items())), f"{s.latent:.4f}",
         " ".join(map(str, v.tolist()))]
        for s, sp, v in zip(specs, split_of, votes)
    ])
    write_text(out / "meta.csv", meta)
    write_text(out / "comments.jsonl", "".join(c + "\n" for c in comments))
    write_text(out / "labels.csv", labels)
    summary = _summary(specs, split_of, votes, comments, n_images=n_images, image_size=image_size,
                       seed=seed, splits=dict(splits), n_voters=n_voters,
                       comments_per_image=comments_per_image)
    write_json(out / "summary.json", summary)
    return summary


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _summary(specs: list[ImageSpec], split_of: list[str], votes: list[np.ndarray],
             comments: list[str], **config: Any) -> dict[str, Any]:
    from pipelines.data.manifest import scores_from_votes

    labelled = np.array([sp != "unlabeled" for sp in split_of])
    scores = scores_from_votes(np.stack(votes))[labelled].astype(np.float64)
    hist = np.bincount(np.clip(np.rint(scores).astype(int), 1, N_LEVELS), minlength=N_LEVELS + 1)[1:]
    fault_counts = {f: sum(f in s.faults for s in specs) for f in FAULTS}
    return {
        "generator": "pipelines.data.demo",
        "config": config,
        "n_images": len(specs),
        "n_levels": N_LEVELS,
        "splits": {sp: split_of.count(sp) for sp in config["splits"]},
        "subjects": {s.name: sum(x.subject is s for x in specs) for s in SUBJECTS},
        "tiers": {t[0]: sum(x.tier == t[0] for x in specs) for t in TIERS},
        "faults": fault_counts,
        "clean_images": sum(not s.faults for s in specs),
        "n_comments": len(comments),
        "score": {
            "mean": round(float(scores.mean()), 4) if len(scores) else None,
            "std": round(float(scores.std()), 4) if len(scores) else None,
            "min": round(float(scores.min()), 4) if len(scores) else None,
            "max": round(float(scores.max()), 4) if len(scores) else None,
            "histogram": {str(k + 1): int(n) for k, n in enumerate(hist)},
        },
        "files": ["images/", "labels.csv", "comments.jsonl", "meta.csv", "summary.json"],
    }
