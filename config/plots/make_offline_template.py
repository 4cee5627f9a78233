"""Build ``offline.html``, the page template of ``dvc plots show`` / ``dvc plots diff``
(``.dvc/config``: ``plots.html_template``), with Vega inlined so the page draws offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so it stays blank
without network. This template has no ``{scripts}`` placeholder (where DVC would put those
CDN tags) and carries the same versions inline instead. To rebuild it:

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2   # the versions dvc-render uses
    for f in vega-*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python config/plots/make_offline_template.py DIR_WITH_THOSE_FOLDERS
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGES = ("vega-5.20.2", "vega-lite-5.2.0", "vega-embed-6.18.2")
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega 5.20.2, vega-lite 5.2.0, vega-embed 6.18.2 (BSD-3-Clause, see below), inlined: no network needed.
         Built by config/plots/make_offline_template.py. -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(src: str) -> None:
    scripts = []
    for name in PACKAGES:
        pkg = Path(src) / name / "package"
        js = (pkg / "build" / f"{name.rsplit('-', 1)[0]}.min.js").read_text(encoding="utf-8")
        if "</script" in js or "{plot_divs}" in js or "{refresh_tag}" in js:
            raise SystemExit(f"{name}: the bundle contains text that would break the page template")
        licence = (pkg / "LICENSE").read_text(encoding="utf-8").replace("*/", "* /")
        scripts.append(f"    <script>/* {name}\n{licence}*/\n{js}\n    </script>")
    out = Path(__file__).with_name("offline.html")
    out.write_text(PAGE % "\n".join(scripts), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
