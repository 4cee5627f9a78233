"""Stage `prepare`: label files -> the manifest (one schema for every data set)."""

from pipelines.data.manifest import build_manifest, write_manifest
from pipelines.io import write_json
from stages.common import DATA, MANIFEST, cli, params


@cli
def main() -> None:
    p = params()
    table, report = build_manifest(p.data.adapter, p.data.labels, p.data.images, **p.data.options)
    write_manifest(MANIFEST, table)
    write_json(DATA / "manifest_report.json", report)


if __name__ == "__main__":
    main()
