"""Stage `demo_data`: generate the bundled demo data set (no download)."""

from pipelines.data.demo import generate_demo
from stages.common import DATA, cli, params


@cli
def main() -> None:
    p = params()
    generate_demo(DATA / "demo", n_images=p.demo.n_images, image_size=p.demo.image_size, seed=p.demo.seed)


if __name__ == "__main__":
    main()
