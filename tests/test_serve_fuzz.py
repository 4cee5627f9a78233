"""A bounded fuzz test against a real `mlflow models serve` on 127.0.0.1.

Seeded random requests from a few concurrent clients: good images, random bytes, truncated
JPEGs and PNGs, wrong types, huge dimensions (header-only bombs), text that is not base64,
paths (off on this server), empty and 1,000-row requests, too many rows, unknown columns,
broken JSON and a wrong content type. Bounded in count (``N_REQUESTS``) and time
(``TIME_BUDGET_S``). Checked: every answer is strict JSON of the expected status, every good
row scores (the same image the same score in every request), every bad row has an error and a
null score, the server answers /ping throughout, and its memory (RSS of the server's process
tree) stays bounded.
"""

from __future__ import annotations

import io
import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.test_serve import b64, png_header, post, register_served_model, serving

N_REQUESTS = 300
CLIENTS = 4
TIME_BUDGET_S = 75
MAX_RSS_GROWTH = 600 * 2**20  # bytes above the RSS after warm-up


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def good_images(rng: np.random.Generator, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        h, w = int(rng.integers(8, 64)), int(rng.integers(8, 64))
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out.append(encoded(im if i % 3 else im.convert("L"), ("PNG", "JPEG", "WEBP")[i % 3]))
    return out


class Fuzzer:
    """Makes requests of known expected outcome: (kind, body, content type, expected per-row good ids or None)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.py = random.Random(seed)
        self.good = good_images(self.rng, 12)
        jpeg = [g for i, g in enumerate(self.good) if i % 3 == 1]
        self.bad_rows = [
            lambda: {"image": b64(self.rng.bytes(int(self.rng.integers(0, 3000))))},  # random bytes
            lambda: {"image": b64((j := self.py.choice(jpeg))[: self.py.randrange(1, len(j) // 2)])},  # truncated JPEG
            lambda: {"image": b64(self.good[0][: self.py.randrange(8, len(self.good[0]) // 2)])},  # truncated PNG
            lambda: {"image": self.py.choice([42, 3.5, True, [1, 2], {"a": 1}, "", "not base64!"])},  # wrong types
            lambda: {"image": b64(png_header(self.py.choice([50_000, 20_000, 9_000]), self.py.choice([50_000, 9_000])))},  # huge
            lambda: {"path": self.py.choice(["/etc/passwd", "../../x.png", "img.png", 7])},  # paths are off
            lambda: {},  # neither column
        ]

    def row(self, p_good: float) -> tuple[dict, int | None]:
        if self.py.random() < p_good:
            i = self.py.randrange(len(self.good))
            return {"image": b64(self.good[i])}, i
        return self.py.choice(self.bad_rows)(), None

    def request(self) -> tuple[str, bytes, str, list[int | None] | None]:
        r = self.py.random()
        if r < 0.70:
            rows = [self.row(0.5) for _ in range(self.py.randrange(1, 9))]
            if not any(d for d, _ in rows):  # no row has a column: the request has none either
                return "unknown column", json.dumps({"dataframe_records": [d for d, _ in rows]}).encode(), "application/json", None
            return "rows", json.dumps({"dataframe_records": [d for d, _ in rows]}).encode(), "application/json", [g for _, g in rows]
        if r < 0.72:
            rows = [self.row(0.8) for _ in range(1000)]
            return "1000 rows", json.dumps({"dataframe_split": {"columns": ["image", "path"],
                                                                 "data": [[d.get("image"), d.get("path")] for d, _ in rows]}}).encode(), \
                "application/json", [g for _, g in rows]
        if r < 0.78:
            return "empty", json.dumps({"dataframe_split": {"columns": ["image"], "data": []}}).encode(), "application/json", []
        if r < 0.82:
            return "1001 rows", json.dumps({"dataframe_records": [{"image": "x"}] * 1001}).encode(), "application/json", None
        if r < 0.88:
            return "unknown column", json.dumps({"dataframe_split": {"columns": ["photo"], "data": [["x"]]}}).encode(), \
                "application/json", None
        if r < 0.94:
            body = json.dumps({"dataframe_records": [{"image": b64(self.good[0])}]}).encode()
            return "broken JSON", body[: self.py.randrange(1, len(body) - 1)], "application/json", None
        return "wrong content type", self.rng.bytes(64), "application/octet-stream", None


EXPECTED_STATUS = {"rows": 200, "1000 rows": 200, "empty": 200, "1001 rows": 400, "unknown column": 400,
                   "broken JSON": 400, "wrong content type": 415}


def tree_rss(proc: psutil.Process) -> int:
    procs = [proc] + proc.children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.slow  # ~2-3 min on 2 shared CPUs: a sqlite store, the server's start, then <= 75 s of requests
def test_fuzzed_requests_keep_the_server_answering(tmp_path):
    uri = register_served_model(tmp_path)
    fuzz = Fuzzer(seed=0)
    requests = [fuzz.request() for _ in range(N_REQUESTS)]
    with serving(tmp_path, uri) as (base, server):
        root = psutil.Process(server.pid)
        # warm-up: every good image once, the reference scores
        status, body = post(base + "/invocations", {"dataframe_records": [{"image": b64(g)} for g in fuzz.good]})
        assert status == 200, body
        reference = [r["score"] for r in body["predictions"]]
        assert all(1 <= s <= 10 for s in reference)
        rss0 = tree_rss(root)
        started = time.monotonic()
        figures = {"requests": 0, "rows": 0, "good_rows": 0, "bad_rows": 0, "bad_requests": 0, "failures": [], "max_s": 0.0}
        peak = [rss0]

        def send(item):
            kind, body, ctype, goods = item
            if time.monotonic() - started > TIME_BUDGET_S:
                return None
            t = time.monotonic()
            status, answer = post(base + "/invocations", body, ctype, timeout=60)
            peak[0] = max(peak[0], tree_rss(root))
            return kind, goods, status, answer, time.monotonic() - t

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for r in pool.map(send, requests) if r is not None]
        for kind, goods, status, answer, seconds in results:
            figures["requests"] += 1
            figures["max_s"] = max(figures["max_s"], seconds)
            if status != EXPECTED_STATUS[kind]:
                figures["failures"].append((kind, status, str(answer)[:200]))
                continue
            if status != 200:
                figures["bad_requests"] += 1
                if kind != "wrong content type":  # MLflow answers 415 in plain text
                    assert isinstance(answer, dict) and answer.get("error_code") and answer.get("message"), (kind, answer)
                continue
            rows = answer["predictions"]
            if len(rows) != len(goods):
                figures["failures"].append((kind, "rows", len(rows), len(goods)))
                continue
            for row, g in zip(rows, goods):
                figures["rows"] += 1
                if g is None:
                    figures["bad_rows"] += 1
                    if not (row["score"] is None and isinstance(row["error"], str) and row["error"]):
                        figures["failures"].append((kind, "bad row", row))
                else:
                    figures["good_rows"] += 1
                    if row["error"] is not None or abs(row["score"] - reference[g]) > 1e-4:
                        figures["failures"].append((kind, "good row", row.get("error"), row.get("score"), reference[g]))
        with urllib.request.urlopen(base + "/ping", timeout=5) as r:
            assert r.status == 200
        growth = peak[0] - rss0
        print(f"\nfuzz: {figures['requests']} requests in {time.monotonic() - started:.0f} s from {CLIENTS} clients, "
              f"{figures['rows']} rows ({figures['good_rows']} good, {figures['bad_rows']} bad), "
              f"{figures['bad_requests']} bad requests, {len(figures['failures'])} failures, slowest {figures['max_s']:.1f} s, "
              f"RSS {rss0 / 2**20:.0f} MiB after warm-up, peak +{growth / 2**20:.0f} MiB")
    assert figures["failures"] == []
    assert figures["requests"] >= 100 and figures["good_rows"] >= 500 and figures["bad_rows"] >= 300
    assert growth < MAX_RSS_GROWTH
