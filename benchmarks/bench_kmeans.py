"""K-means at scale: the `features` stage's estimators against full K-means (n_init=10).

The features stage clusters the semantic tag-similarity vectors (N x M). Full Lloyd's K-means
with 10 restarts on all of AVA's ~230k training rows x 2,145 tags took most of the stage's
850 s. This benchmark fits each estimator of ``pipelines.semantics.fit_kmeans`` on the same
rows and compares it with the reference, full K-means with 10 restarts on every row (the old
stage's estimator). All run, as the stage runs them, on ``kmeans_space``: the same pairwise
distances as the N x M similarities in at most D dims (``tests/test_semantics.py`` checks the
equality), so the reference is the old stage's K-means problem exactly. Inertia is computed on
the similarities themselves:

- ``inertia_ratio``: its inertia / the reference's (1.0 = as tight; < 1 = tighter);
- ``ari`` / ``nmi``: agreement of its assignment with the reference's (1.0 = the same partition);
- ``fit_s``: fit time, plus the assignment of every row (CPU seconds, ``cpu_s``, too: on a
  shared machine wall time swings with the other load).

Two workloads:

- ``real``: the real-feature benchmark's 6,138 AVA images (384-d embeddings of their real
  comments, ``../shared/data/bench/dpc_minilm``) against its 2,145 most frequent phrases;
- ``synthetic``: ``--rows`` L2-normalised 768-d embeddings drawn around 40 topic directions
  with Zipf popularity (AVA's long tail of subjects), against 2,145 tags drawn near the topics,
  at CLIP's logit scale 100.

``python benchmarks/bench_kmeans.py`` -> ``benchmarks/results/kmeans.json`` (minutes; most of it is the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.io import write_json  # noqa: E402
from pipelines.semantics import assign_clusters, cluster_means, fit_kmeans, inertia, kmeans_space  # noqa: E402

SHARED = Path(os.environ.get("IAA_SHARED_DATA", ROOT.parent / "shared" / "data"))
N_SEMANTIC, N_ATTRIBUTE = 2145, 1659  # the TMCR paper's tag libraries


def synthetic_embeddings(n: int, dim: int = 768, *, n_topics: int = 40, seed: int = 0,
                         n_semantic: int = N_SEMANTIC, n_attribute: int = N_ATTRIBUTE):
    """(image embeddings n x dim, tag embeddings (n_semantic + n_attribute) x dim), all unit rows, float32.

    Images mix a main topic (Zipf popularity) with a second one and noise; semantic tags lie
    near the topics, attribute tags anywhere. Built in blocks (bounded temporaries).
    """
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((n_topics, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    pop = 1.0 / np.arange(1, n_topics + 1) ** 1.1
    pop /= pop.sum()
    emb = np.empty((n, dim), np.float32)
    for s in range(0, n, 65_536):
        m = min(65_536, n - s)
        z1, z2 = rng.choice(n_topics, m, p=pop), rng.choice(n_topics, m, p=pop)
        x = topics[z1] + 0.5 * topics[z2] + rng.standard_normal((m, dim), dtype=np.float32) * (1.2 / np.sqrt(dim))
        emb[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    sem = topics[rng.choice(n_topics, n_semantic)] + rng.standard_normal((n_semantic, dim), dtype=np.float32) * (
        1.5 / np.sqrt(dim))
    attr = rng.standard_normal((n_attribute, dim), dtype=np.float32)
    tags = np.concatenate([sem, attr]).astype(np.float32)
    tags /= np.linalg.norm(tags, axis=1, keepdims=True)
    return emb, tags


def real_workload() -> tuple[np.ndarray, np.ndarray, float, str] | None:
    items, vocab = SHARED / "bench" / "dpc_minilm" / "items.parquet", SHARED / "bench" / "dpc_minilm" / "vocab.parquet"
    if not (items.is_file() and vocab.is_file()):
        return None
    import pyarrow.parquet as pq

    def matrix(path: Path) -> np.ndarray:
        col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
        return np.asarray(col.flatten(), np.float32).reshape(len(col), -1)

    x, v = matrix(items), matrix(vocab)[:N_SEMANTIC]  # vocab is ordered by document frequency
    return x, v, 1.0, f"{items.parent}: {len(x)} images x {len(v)} phrases"


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def compare(emb: np.ndarray, sem_tags: np.ndarray, scale: float, k: int, seed: int, variants: dict[str, dict]) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    sims = (emb @ sem_tags.T) * np.float32(scale)
    y, space_s, space_cpu = timed(lambda: kmeans_space(emb, sem_tags, scale))
    ref, ref_s, ref_cpu = timed(lambda: fit_kmeans(y, k, seed, method="full", n_init=10))
    ref_labels = ref.labels_.astype(np.int32)
    ref_inertia = inertia(sims, ref_labels, cluster_means(sims, ref_labels, k))
    out = {"space_dims": int(y.shape[1]), "space_s": space_s, "space_cpu_s": space_cpu,
           "reference": {"method": "full", "n_init": 10, "on": f"every row, in the exact {y.shape[1]}-d space",
                         "fit_s": ref_s, "cpu_s": ref_cpu, "inertia": ref_inertia, "n_iter": int(ref.n_iter_)}}
    print("reference", out["reference"], flush=True)
    for name, kw in variants.items():
        def fit():
            km = fit_kmeans(y, k, seed, **kw)
            return assign_clusters(y, km.cluster_centers_)
        labels, fit_s, cpu_s = timed(fit)
        out[name] = {**kw, "fit_s": fit_s, "cpu_s": cpu_s, "cpu_speedup": round(ref_cpu / max(cpu_s, 1e-3), 1),
                     "inertia_ratio": round(inertia(sims, labels, cluster_means(sims, labels, k)) / ref_inertia, 4),
                     "ari": round(float(adjusted_rand_score(ref_labels, labels)), 4),
                     "nmi": round(float(normalized_mutual_info_score(ref_labels, labels)), 4)}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_000, help="synthetic training rows")
    ap.add_argument("--clusters", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kmeans.json")
    args = ap.parse_args()
    result: dict = {"benchmark": "kmeans", "clusters": args.clusters, "seed": args.seed, "cpu_count": os.cpu_count()}
    real = real_workload()
    if real is not None:
        emb, sem, scale, what = real
        result["real"] = {"data": what, **compare(emb, sem, scale, args.clusters, args.seed, {
            "default": {"method": "sample"},
            "sample_2k": {"method": "sample", "fit_rows": 2000},
            "minibatch": {"method": "minibatch"},
        })}
    else:
        result["real"] = f"skipped: {SHARED / 'bench' / 'dpc_minilm'} not found (set IAA_SHARED_DATA)"
    emb, tags = synthetic_embeddings(args.rows, seed=args.seed, n_attribute=0)
    result["synthetic"] = {"data": f"{args.rows} x {N_SEMANTIC} synthetic (768-d, 40 Zipf topics, scale 100)", **compare(
        emb, tags, 100.0, args.clusters, args.seed, {
            "default": {"method": "sample"},
            "sample_5k": {"method": "sample", "fit_rows": 5_000},
            "minibatch": {"method": "minibatch"},
        })}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
