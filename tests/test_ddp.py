"""Every training loop under DDP on 2 gloo CPU workers (one Ray for the module).

Parity means: one optimizer step on one global batch taken by 2 workers (each its own shard)
is the step 1 worker takes on the whole batch. Compared as parity is defined, not as one
machine's float noise:
- the gradients (AdamW's first ``exp_avg / (1 - beta1)``) agree in norm, relative to the
  gradient's own size (float32 sums in another order differ in the last digits, by machine);
- the parameters: AdamW's first step moves every element by lr * g / (|g| + eps), i.e. by lr
  where the gradient is resolved; so where |g| stands clear of the noise the two steps agree to
  float precision (|g| above 1e-3 of the model's largest gradient element), and everywhere they
  differ by at most 2 lr (a near-zero gradient's sign may differ: its step is +-lr either way).
Loops whose models hold BatchNorm (the family models) cannot take the same step on two
half-batches as on one batch (BatchNorm normalises over the batch); there DDP's contract is
checked: the replicas hold the same weights after every epoch, and they moved.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.config import TrainParams
from pipelines.train.runner import ray_config, run_training

pytestmark = pytest.mark.slow
LOCAL, TWO = TrainParams(num_workers=0), TrainParams(num_workers=2)


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def first_step_gradients(state: dict, names: list[str], beta1: float = 0.9) -> dict[str, torch.Tensor]:
    """The gradient of each parameter in the first AdamW step: exp_avg = (1 - beta1) * g."""
    return {names[i]: s["exp_avg"].double() / (1 - beta1) for i, s in state["optimizer"]["state"].items()}


def assert_same_step(one: dict, two: dict, names: list[str], lr: float) -> int:
    """Parity of one AdamW step (see the module docstring); returns how many tensors moved.

    A gradient that is zero in exact arithmetic (e.g. a BatchNorm bias feeding another
    BatchNorm) is float noise in both runs: the tolerance has a floor relative to the largest
    gradient of the model, the scale of float32's rounding in its sums."""
    g1, g2 = first_step_gradients(one, names), first_step_gradients(two, names)
    assert g1.keys() == g2.keys() and g1
    floor = 1e-5 * max(g.norm().item() for g in g1.values())
    largest = max(g.abs().max().item() for g in g1.values())
    moved = 0
    for k, g in g1.items():
        scale = g.norm().item()
        assert (g2[k] - g).norm().item() <= 1e-4 * scale + floor, (k, (g2[k] - g).norm().item(), scale, floor)
        p1, p2 = one["model"][k].double(), two["model"][k].double()
        diff = (p2 - p1).abs()
        assert diff.max().item() <= 2 * lr * (1 + 1e-3), k  # the step size bounds any disagreement
        resolved = g.abs() > 1e-3 * largest  # clear of float noise
        if resolved.any():
            assert diff[resolved].max().item() <= 1e-6 + 1e-5 * lr, k
        moved += bool(resolved.any())
    return moved


def test_head_two_workers_take_the_same_step_as_one(tmp_path, monkeypatch, ray_two_cpus):
    """The head (TM + CR MLP, linear probe) on one full batch: 2 shards of 54 rows vs all 108."""
    from pipelines.heads.train import supervised_loop
    from pipelines.ranking.encoder import CREncoder
    from pipelines.train.data import load_features
    from tests.synthetic import make_features
    from tests.test_train import HEAD

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    make_features(tmp_path / "features.parquet", n=190)
    n_train = len(load_features(tmp_path / "features.parquet", None).split_of("train"))
    assert n_train % 2 == 0  # equal shards: the mean of the two shard means is the batch mean
    torch.manual_seed(0)
    torch.save({"spec": CREncoder(16, 32, 16, 0.0).spec(), "model": CREncoder(16, 32, 16, 0.0).state_dict()}, tmp_path / "cr.pt")
    head = {**HEAD, "tfa": False, "flsa": False, "dropout": 0.0, "keep_best": False, "batch_size": n_train}
    lr = 1e-3
    config = {"features_path": str(tmp_path / "features.parquet"), "embeddings_path": str(tmp_path / "embeddings"),
              "cr_path": str(tmp_path / "cr.pt"), "head": head, "epochs": 1, "lr": lr, "seed": 0}
    one = run_training(supervised_loop, config, LOCAL, stage="head-1", inputs=[config["features_path"]])
    two = run_training(supervised_loop, config, TWO, stage="head-2", inputs=[config["features_path"]])
    from pipelines.heads.build import head_from_arch

    names = [n for n, p in head_from_arch(one["arch"]).named_parameters() if p.requires_grad]
    assert assert_same_step(one, two, names, lr) == len(names)


def test_image_pretrain_two_workers_take_the_same_step_as_one(tmp_path, monkeypatch, ray_two_cpus):
    """Image E_CR (EfficientNet with BatchNorm): one step of 2 balanced batches; each forward pass is
    one balanced batch either way, so BatchNorm normalises the same rows."""
    from pipelines.ranking.backbone import ImageCREncoder
    from pipelines.ranking.pretrain import pretrain_loop
    from tests.test_image_ecr import BACKBONE, image_config, inputs, make_image_data

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    data = make_image_data(tmp_path, one_cluster=True)
    config = image_config(data, epochs=1, batches_per_cluster=2, batches_per_step=2)
    one = run_training(pretrain_loop, config, LOCAL, stage="pretrain-1", inputs=inputs(data))
    two = run_training(pretrain_loop, config, TWO, stage="pretrain-2", inputs=inputs(data))
    torch.manual_seed(config["seed"])  # the loop's initial weights
    names = list(dict(ImageCREncoder(BACKBONE, 16, 8, 0.0, image_size=24, resize=32).named_parameters()))
    lr = max(config["lr"], config["image"]["backbone_lr"])
    assert assert_same_step(one, two, names, lr) > len(names) // 2


def test_fine_tune_two_workers_take_the_same_step_as_one(tmp_path, monkeypatch, ray_two_cpus):
    """Backbone + head on pixels, one full batch of 30 images: a GroupNorm EfficientNet (no
    BatchNorm), so two half-batches make the batch's gradient."""
    from pipelines.heads.finetune import FineTuneModel, finetune_loop
    from pipelines.ranking.backbone import ImageCREncoder
    from tests.test_finetune import ft_config
    from tests.test_image_ecr import HEAD, make_image_data

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    make_image_data(tmp_path)
    torch.manual_seed(0)
    enc = ImageCREncoder("test_efficientnet_gn", 16, 8, 0.0, image_size=32, resize=32)
    torch.save({"spec": enc.spec(), "model": enc.state_dict()}, tmp_path / "cr.pt")
    head = {**HEAD, "protocol": "fine_tune", "tfa": False, "flsa": False, "dropout": 0.0, "keep_best": False, "batch_size": 30}
    # views without random crop or flip: the parity of the step, not of the augmentation draws
    config = ft_config(tmp_path, head=head, epochs=1, lr=1e-3, backbone_lr=1e-3)
    config["image"]["hflip"] = False
    one = run_training(finetune_loop, config, LOCAL, stage="ft-1", inputs=[str(tmp_path / "cr.pt")])
    two = run_training(finetune_loop, config, TWO, stage="ft-2", inputs=[str(tmp_path / "cr.pt")])
    from pipelines.heads.build import head_from_arch

    ft = FineTuneModel(enc.backbone, head_from_arch(one["arch"]), head)
    from pipelines.heads.train import freeze_unused

    freeze_unused(ft.head)  # the optimizer's order: backbone group, then the head's trainable parameters
    names = [f"backbone.{n}" for n, _ in ft.backbone.named_parameters()]
    names += [f"head.{n}" for n, p in ft.head.named_parameters() if p.requires_grad]

    def joined(state: dict) -> dict:
        model = {f"head.{k}": v for k, v in state["model"].items()}
        model.update({f"backbone.{k}": v for k, v in state["cr_backbone"]["backbone"].items()})
        return {**state, "model": model}

    one, two = joined(one), joined(two)
    assert assert_same_step(one, two, names, 1e-3) > len(names) // 2


def _recording_family_loop():
    """The family loop, recording each worker's parameters after every epoch (a closure, so Ray
    ships it by value: the workers cannot import this test module)."""

    def loop(config: dict) -> None:
        import json
        from pathlib import Path

        import ray.train
        import torch

        import pipelines.models.image_loop as image_loop

        rank = ray.train.get_context().get_world_rank()
        real = image_loop.FamilyTraining.train_epoch

        def train_epoch(self, epoch):
            out = real(self, epoch)
            flat = torch.cat([p.detach().flatten() for p in self.model.parameters()])
            (Path(config["record"]) / f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(flat.tolist()))
            return out

        image_loop.FamilyTraining.train_epoch = train_epoch
        try:
            image_loop.image_family_loop({k: v for k, v in config.items() if k != "record"})
        finally:
            image_loop.FamilyTraining.train_epoch = real

    return loop


def test_family_replicas_stay_identical_under_ddp(tmp_path, monkeypatch, ray_two_cpus):
    """The AE-fusion model (BatchNorm) on 2 workers, each on its own shard of the images: after
    every epoch both replicas hold the same weights (DDP averaged the gradients), and they moved."""
    from pipelines.config import AesafParams, AmpParams, ModelParams
    from stages.family import family_config
    from pipelines.data.demo import generate_demo
    from pipelines.data.adapters import build_manifest
    from pipelines.data.manifest import write_manifest

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    generate_demo(tmp_path / "demo", n_images=24, image_size=48, progress=False)
    table, _ = build_manifest("votes_csv", tmp_path / "demo" / "labels.csv", tmp_path / "demo" / "images")
    write_manifest(tmp_path / "manifest.parquet", table)
    (tmp_path / "record").mkdir()
    m = ModelParams(family="aesaf", epochs=2, lr=1e-3, batch_size=4, image_size=32, loader_workers=0,
                    amp=AmpParams(dtype="fp32"), aesaf=AesafParams(widths=[8, 8, 16, 16], group_maps=4, hidden=8))
    config = {**ray_config(family_config(m, tmp_path / "manifest.parquet", tmp_path)), "seed": 0, "record": str(tmp_path / "record")}
    run_training(_recording_family_loop(), config, TWO, stage="family-ddp", inputs=[str(tmp_path / "manifest.parquet")])
    for epoch in range(2):
        a, b = (np.array(json.loads((tmp_path / "record" / f"rank{r}-epoch{epoch}.json").read_text())) for r in (0, 1))
        np.testing.assert_array_equal(a, b)
    first = np.array(json.loads((tmp_path / "record" / "rank0-epoch0.json").read_text()))
    last = np.array(json.loads((tmp_path / "record" / "rank0-epoch1.json").read_text()))
    assert not np.array_equal(first, last)
