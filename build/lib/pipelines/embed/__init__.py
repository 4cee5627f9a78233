"""open_clip image/text encoders and the chunked Parquet embedding cache.

Public API::

    load_clip(model, pretrained, *, allow_random_fallback=False, device="cpu", seed=None) -> ClipBundle
    embed_images(bundle, items, out_dir, *, batch_size=64, num_workers=2, chunk_rows=512,
                 precision="auto" | "fp32" | "int8" | "bf16", fingerprint=None, progress=True) -> report
    ray_engine.embed_images_ray(bundle, items, out_dir, EmbedRayParams(...), *, chunk_rows=512,
                 precision="auto", fingerprint=None, num_workers=2, progress=True) -> report
                 (the same cache on Ray Data: decode tasks + an actor pool; imported on demand)
    read_image_embeddings(out_dir) -> (ids, N x D float32)
    embed_texts(bundle, texts, batch_size=256) -> N x D float32
    write_text_embeddings(path, tags, kinds, emb) / read_text_embeddings(path)
"""

from pipelines.embed.cache import read_image_embeddings, read_text_embeddings, write_text_embeddings
from pipelines.embed.clip import ClipBundle, load_clip
from pipelines.embed.encode import PRECISIONS, embed_images, embed_texts

__all__ = [
    "PRECISIONS",
    "ClipBundle",
    "embed_images",
    "embed_texts",
    "load_clip",
    "read_image_embeddings",
    "read_text_embeddings",
    "write_text_embeddings",
]
