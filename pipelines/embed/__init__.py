"""open_clip image/text encoders and the chunked Parquet embedding cache.

The package imports nothing: a reader of the cache (``cache``) does not load open_clip or the
encoders. The API, by module::

    clip.load_clip(model, pretrained, *, allow_random_fallback=False, device="cpu", seed=None) -> ClipBundle
    encode.embed_images(bundle, items, out_dir, *, batch_size=64, num_workers=2 | "auto", chunk_rows=512,
                 precision="auto" | "fp32" | "int8" | "bf16", decode="cpu" | "gpu",
                 fingerprint=None, progress=True) -> report
    encode.resolve_precision(precision, device) -> "fp32" | "bf16" | "int8"  (no timing: device features)
    ray_engine.embed_images_ray(bundle, items, out_dir, EmbedRayParams(...), *, chunk_rows=512,
                 precision="auto", decode="cpu", fingerprint=None, num_workers=2, progress=True) -> report
                 (the same cache on Ray Data: decode tasks + an actor pool; imported on demand)
    cache.read_image_embeddings(out_dir) -> (ids, N x D float32)
    encode.embed_texts(bundle, texts, batch_size=256) -> N x D float32
    cache.write_text_embeddings(path, tags, kinds, emb) / read_text_embeddings(path)
"""
