"""Model-family formulas (seeds 002 and 003) against slow loop references written from the papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.io import DataError
from pipelines.models import build, n_params
from pipelines.models.aesaf import AESAF, activation_loss, sd_correlations, spp
from pipelines.models.corner_grid import corner_cells, corner_grid, corner_grid_uint8
from pipelines.models.losses import re_emd_loss
from pipelines.models.mnet import MNet
from pipelines.models.pooling import BackPool, ForePool, adaptive_geometry


# ----------------------------------------------------------------------------- pooling, eq. 1-2
def ref_pool(x: np.ndarray, h_out: int, w_out: int, mode: str) -> np.ndarray:
    """Eq. 1 / 2 window by window, with the paper's adaptive stride and kernel."""
    b, c, h, w = x.shape
    sh, sw = h // h_out, w // w_out
    kh, kw = h - (h_out - 1) * sh, w - (w_out - 1) * sw
    out = np.zeros((b, c, h_out, w_out))
    for n in range(b):
        for ch in range(c):
            for i in range(h_out):
                for j in range(w_out):
                    win = [x[n, ch, i * sh + u, j * sw + v] for u in range(kh) for v in range(kw)]
                    z = sum(math.exp(a) for a in win)
                    t = [math.exp(a) / z for a in win]
                    if mode == "back":
                        t = [1.0 - ti for ti in t]
                    out[n, ch, i, j] = sum(ti * a for ti, a in zip(t, win))
    return out


@pytest.mark.parametrize("h,w,ho,wo", [(7, 11, 2, 3), (9, 9, 1, 1), (13, 5, 4, 2), (8, 8, 3, 3), (224, 3, 7, 1)])
def test_adaptive_geometry_tiles_the_input(h, w, ho, wo):
    (kh, kw), (sh, sw) = adaptive_geometry(h, w, ho, wo)
    assert (sh, sw) == (h // ho, w // wo)
    # the last window ends exactly at the border (padding 0), output size is (ho, wo)
    assert (ho - 1) * sh + kh == h and (wo - 1) * sw + kw == w
    assert (h - kh) // sh + 1 == ho and (w - kw) // sw + 1 == wo


@pytest.mark.parametrize("shape,out", [((2, 3, 7, 11), (2, 3)), ((1, 2, 5, 5), (1, 1)), ((1, 1, 13, 6), (4, 2))])
def test_fore_and_back_pool_match_the_equations(shape, out):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    fore = ForePool(out)(x).numpy()
    back = BackPool(out)(x).numpy()
    np.testing.assert_allclose(fore, ref_pool(x.numpy(), *out, "fore"), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back, ref_pool(x.numpy(), *out, "back"), rtol=1e-6, atol=1e-6)
    assert fore.shape[-2:] == out


def test_forepool_favours_high_and_backpool_low_activations():
    x = torch.tensor([[[[0.0, 0.0], [0.0, 5.0]]]])
    mean = x.mean().item()
    f = ForePool(1)(x).item()
    b = BackPool(1)(x).item() / 3  # eq. 2 weights sum to |window| - 1 = 3
    assert f > 4.5  # dominated by the salient activation
    assert b < mean  # the background (zeros) weighs more than in a plain average


def test_backpool_refuses_single_cell_windows_and_too_small_inputs():
    with pytest.raises(ValueError, match="identically 0"):
        BackPool(2)(torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="smaller than the pooled output"):
        ForePool(3)(torch.randn(1, 1, 2, 5))


# ----------------------------------------------------------------------------- Re-EMD, eq. 4
def ref_re_emd(pred, target, alpha, beta, gamma):
    total = 0.0
    for p_hat, p in zip(pred, target):
        n = len(p)
        s = sum(p)
        m = [alpha * (pk / s + beta) for pk in p]
        fp = fq = acc = 0.0
        for k in range(n):
            fp += p[k]
            fq += p_hat[k]
            acc += abs(m[k] * (fp - fq)) ** gamma
        total += (acc / n) ** (1.0 / gamma)
    return total / len(pred)


@pytest.mark.parametrize("alpha,beta,gamma", [(10.0, 0.1, 2.0), (1.0, 0.0, 1.0), (3.0, 0.5, 2.0)])
def test_re_emd_matches_the_equation(alpha, beta, gamma):
    g = torch.Generator().manual_seed(1)
    pred = torch.softmax(torch.randn(5, 10, generator=g, dtype=torch.float64), 1)
    target = torch.softmax(torch.randn(5, 10, generator=g, dtype=torch.float64) * 2, 1)
    got = re_emd_loss(pred, target, alpha=alpha, beta=beta, gamma=gamma).item()
    assert got == pytest.approx(ref_re_emd(pred.tolist(), target.tolist(), alpha, beta, gamma), rel=1e-9)


def test_re_emd_weights_the_majority_levels():
    # same CDF error, once on a level most raters chose and once on a level few chose
    target = torch.tensor([[0.05, 0.9, 0.05]])
    err_on_major = torch.tensor([[0.05, 0.8, 0.15]])  # CDF error at k=2 (weight of p_2 = 0.9)
    err_on_minor = torch.tensor([[0.15, 0.8, 0.05]])  # CDF error at k=1, k=2 ... differs at k=1 (weight of p_1)
    a = re_emd_loss(err_on_major, target).item()
    b = re_emd_loss(err_on_minor, target).item()
    assert a > b
    # uniform votes: constant weight alpha (1/N + beta) -> a scaled EMD
    uni = torch.full((1, 4), 0.25)
    pred = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    from pipelines.heads.losses import emd_loss

    assert re_emd_loss(pred, uni).item() == pytest.approx(10 * (0.25 + 0.1) * emd_loss(pred, uni).item(), rel=1e-6)


def test_re_emd_gradient_is_finite_at_an_exact_match():
    p = torch.softmax(torch.randn(3, 10), 1).requires_grad_(True)
    re_emd_loss(p, p.detach().clone()).backward()
    assert torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- Corner Grid, eq. 6-9
def ref_corner_grid(img: np.ndarray, r: float) -> np.ndarray:
    """img (3, H, W) float. Eq. 6 means, W = their mean, eq. 7-9 per pixel in the four cells."""
    _, h, w = img.shape
    means = [sum(img[c, y, x] for y in range(h) for x in range(w)) / (w * h) for c in range(3)]
    gray = sum(means) / 3
    wg, hg = int(w * r), int(h * r)
    cells = [(0, 0, wg, hg), (w - wg, 0, w, hg), (0, h - hg, wg, h), (w - wg, h - hg, w, h)]
    out = img.copy()
    for x0, y0, x1, y1 in cells:
        for y in range(y0, y1):
            for x in range(x0, x1):
                for c in range(3):
                    gain = gray / means[c] if means[c] > 0 else 1.0  # an all-zero channel stays as it is
                    out[c, y, x] = min(max(gain * img[c, y, x], 0.0), 1.0)
    return out


@pytest.mark.parametrize("h,w", [(23, 41), (40, 40), (64, 31)])
def test_corner_grid_pixels_match_the_equations(h, w):
    rng = np.random.default_rng(0)
    img = rng.random((3, h, w)) * np.array([0.9, 0.5, 0.2])[:, None, None]  # a colour cast: gains differ
    got = corner_grid(torch.from_numpy(img), r=0.1).numpy()
    np.testing.assert_allclose(got, ref_corner_grid(img, 0.1), rtol=1e-12, atol=1e-12)
    changed = np.any(got != img, axis=0)
    wg, hg = int(w * 0.1), int(h * 0.1)
    assert changed.sum() <= 4 * wg * hg and changed.sum() > 0
    assert not changed[hg:h - hg, :].any() and not changed[:, wg:w - wg].any()


def test_corner_grid_blue_uses_the_blue_mean_and_batches_per_image():
    img = torch.zeros(2, 3, 20, 20)
    img[0, 0], img[0, 1], img[0, 2] = 0.6, 0.3, 0.15  # gray = 0.35
    img[1] = 0.5
    out = corner_grid(img, r=0.1)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.35, 0.35, 0.35])  # gray-world: every channel -> W
    assert torch.equal(out[1], img[1])  # already gray: unchanged
    assert corner_cells(20, 20, 0.1)[3] == (18, 18, 20, 20)


def test_corner_grid_uint8_rounds_and_clips():
    img = np.zeros((10, 10, 3), np.uint8)
    img[..., 0] = 250
    img[..., 1] = 10
    img[0, 0] = (255, 255, 0)
    out = corner_grid_uint8(img, r=0.2)
    ref = ref_corner_grid(img.transpose(2, 0, 1).astype(np.float64) / 255.0, 0.2)
    # clipping at 255 in uint8 space equals clipping at 1 in [0, 1] space
    np.testing.assert_array_equal(out, np.round(ref * 255).astype(np.uint8).transpose(1, 2, 0))


@pytest.mark.parametrize("img_hw", [(224, 224), (300, 400), (400, 250)])
def test_stage2_corner_grid_lands_on_the_image_not_the_padding(tmp_path, img_hw):
    """M+MNet stage 2: the image is fitted into 248 x 312 with constant padding; the cells go to
    the corners of the pasted image, whose pixels alone give the means, and no padding pixel moves."""
    from PIL import Image

    from pipelines.models.augment import pad_box
    from pipelines.models.image_loop import image_tensor, load_batch, normalise

    h, w = img_hw
    rng = np.random.default_rng(h + w)
    arr = (rng.random((h, w, 3)) * np.array([230, 120, 40])).astype(np.uint8)  # a colour cast
    Image.fromarray(arr).save(tmp_path / "im.png")
    size = (248, 312)
    plain = load_batch([str(tmp_path / "im.png")], size, "pad")[0]
    grid = load_batch([str(tmp_path / "im.png")], size, "pad", grid_r=0.1)[0]
    x0, y0, x1, y1 = pad_box(w, h, size)
    assert (x1 - x0 == 312) or (y1 - y0 == 248)  # fitted: one side fills the canvas
    canvas = image_tensor(Image.fromarray(arr), size, "pad")
    content = canvas[:, y0:y1, x0:x1]
    assert content.min(dim=0).values.max() > 0  # the box is the image ...
    outside = torch.ones(size, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert canvas[:, outside].abs().max() == 0 if outside.any() else True  # ... and the rest is padding
    changed = (grid != plain).any(dim=0)
    assert changed.sum() > 0 and not changed[outside].any()
    expected = normalise(torch.from_numpy(ref_corner_grid(content.double().numpy(), 0.1)).float())
    torch.testing.assert_close(grid[:, y0:y1, x0:x1], expected, atol=1e-5, rtol=0)
    # flipped: the same grid, mirrored (the cells are symmetric, the box is recomputed on the flip)
    flipped = load_batch([str(tmp_path / "im.png")], size, "pad", grid_r=0.1, flip=torch.tensor([True]))[0]
    torch.testing.assert_close(flipped, normalise(corner_grid(canvas, 0.1, box=(x0, y0, x1, y1)).flip(-1)))
    with pytest.raises(ValueError, match="box"):
        corner_grid(canvas, 0.1, box=(0, 0, 400, 10))


def test_stage1_random_crop_is_a_224_window_of_the_256_resize(tmp_path):
    from PIL import Image

    from pipelines.models.augment import crop_source, crops_in
    from pipelines.models.image_loop import image_tensor, load_batch, normalise

    arr = (np.random.default_rng(0).random((90, 140, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "im.png")
    assert crop_source((224, 224)) == (256, 256) and crop_source((128, 128)) == (146, 146)
    big = normalise(image_tensor(Image.fromarray(arr), (256, 256), "resize"))
    for frac, (oy, ox) in [((0.0, 0.0), (0, 0)), ((0.9999, 0.9999), (32, 32)), ((0.5, 0.25), (16, 8))]:
        got = load_batch([str(tmp_path / "im.png")], (224, 224), "resize", crop=torch.tensor([frac]))[0]
        assert got.shape == (3, 224, 224)
        torch.testing.assert_close(got, big[:, oy : oy + 224, ox : ox + 224])
    flip = load_batch([str(tmp_path / "im.png")], (224, 224), "resize", crop=torch.tensor([[0.5, 0.25]]), flip=torch.tensor([True]))[0]
    torch.testing.assert_close(flip, big[:, 16:240, 8:232].flip(-1))
    # stage 1 (and the single schedule) crops square resizes; stage 2 (padded) and stage 3 do not
    assert crops_in(1, "resize", "random") and not crops_in(1, "resize", "off")
    assert not crops_in(2, "pad", "random") and not crops_in(3, "resize", "random") and not crops_in(1, "short_side", "random")


def test_family_recipes_are_the_papers_and_params_override_them():
    from pipelines.config import ModelParams
    from pipelines.models import make_optimizer, resolve
    from stages.family import family_config

    mnet, aesaf = (family_config(ModelParams(family=f), "manifest.parquet", ".").model for f in ("mnet", "aesaf"))
    assert (mnet.optimizer, mnet.crop, mnet.corner_grid) == ("adam", "random", "with_mixed")
    assert (aesaf.optimizer, aesaf.crop, aesaf.corner_grid) == ("adam", "off", "off")  # seed 002: flips only
    assert aesaf.hflip and mnet.hflip
    own = family_config(ModelParams(family="aesaf", corner_grid="always", optimizer="sgd", crop="random"), "manifest.parquet", ".").model
    assert (own.optimizer, own.crop, own.corner_grid) == ("sgd", "random", "always")
    assert resolve("aesaf", "corner_grid", "with_mixed") == "with_mixed"
    w = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(w, "sgd", 0.01, 1e-4, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    assert isinstance(make_optimizer(w, "adam", 1e-3), torch.optim.Adam)
    with pytest.raises(DataError, match="model.optimizer"):
        make_optimizer(w, "lbfgs", 1e-3)


# ----------------------------------------------------------------------------- SPP and the SAF module
def ref_spp(x: np.ndarray, levels=(1, 2, 4)) -> np.ndarray:
    h, w = x.shape[2:]
    out = []
    for n in levels:
        for i in range(n):
            for j in range(n):
                y0, y1 = (i * h) // n, -((-(i + 1) * h) // n)
                x0, x1 = (j * w) // n, -((-(j + 1) * w) // n)
                out.append(x[:, :, y0:y1, x0:x1].max(axis=(2, 3)))
    return np.stack(out, axis=2)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 50), (97, 13), (7, 7), (2, 9)])
def test_spp_has_21_bins_for_any_aspect_ratio(h, w):
    x = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    got = spp(x)
    assert got.shape == (2, 5, 21)
    np.testing.assert_allclose(got.numpy(), ref_spp(x.numpy()), rtol=0, atol=0)


def test_group_average_pooling_and_activation_loss():
    m = AESAF(4, group_maps=3, widths=(8, 8), hidden=4)
    f = torch.randn(2, 12, 5, 7)
    gap = m.group_average(f)
    ref = np.array([[f[b, g * 3:(g + 1) * 3].mean().item() for g in range(4)] for b in range(2)])
    np.testing.assert_allclose(gap.numpy(), ref, rtol=1e-5, atol=1e-6)
    a = torch.softmax(gap, 1)
    t = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    ref_l1 = sum(abs(a[b, k].item() - t[b, k].item()) for b in range(2) for k in range(4)) / 2
    assert activation_loss(a, t).item() == pytest.approx(ref_l1, rel=1e-6)


def test_split_regressor_logit_m_sees_only_group_m():
    torch.manual_seed(0)
    m = AESAF(4, group_maps=3, widths=(8, 8), hidden=4, split=True).eval()
    f = torch.randn(1, 12, 6, 5)
    base, _ = m.regress(f)
    g = f.clone()
    g[:, 6:9] += 3.0  # group 2 only
    moved, _ = m.regress(g)
    diff = (moved - base).abs()[0]
    assert diff[2] > 0 and diff[[0, 1, 3]].max() == 0
    joint = AESAF(4, group_maps=3, widths=(8, 8), hidden=4, split=False).eval()
    jd = (joint.regress(g)[0] - joint.regress(f)[0]).abs()[0]
    assert (jd > 0).sum() > 1  # the conventional regressor mixes the groups


def test_sd_correlations_against_numpy():
    rng = np.random.default_rng(3)
    p, q = rng.dirichlet(np.ones(10), 30), rng.dirichlet(np.ones(10), 30)
    lv = np.arange(1, 11)
    sd = lambda d: np.array([math.sqrt(sum(d[i] * (lv - d[i] @ lv) ** 2)) for i in range(len(d))])
    got = sd_correlations(p, q)
    assert got["plcc_sd"] == pytest.approx(np.corrcoef(sd(p), sd(q))[0, 1], rel=1e-6)


# ----------------------------------------------------------------------------- the families
@pytest.mark.parametrize("hw", [(97, 131), (64, 64), (224, 171)])
def test_families_run_on_odd_input_sizes(hw):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw)
    for name in ("mnet", "aesaf"):
        m = build(name, 10).eval()
        with torch.no_grad():
            out = m(x)
        assert out["probs"].shape == (2, 10)
        assert torch.allclose(out["probs"].sum(1), torch.ones(2), atol=1e-5)
        if name == "aesaf":
            assert out["recon"].shape == x.shape


def test_mnet_parameter_count_is_its_parts():
    from torchvision.models import mobilenet_v2

    m = MNet(10)
    branch = n_params(mobilenet_v2(weights=None).features)  # 2,223,872
    c = 1280
    attn = 2 * c * (c // 8) + 1
    fuse = 2 * c * 128 + 2 * 128
    head = 128 * 10 + 10
    assert n_params(m) == 2 * branch + attn + fuse + head
    assert 4.4e6 < 2 * branch < 4.5e6  # two MobileNetV2 feature stacks alone: the paper's 4.5 M


def test_registry_rejects_unknown_names_and_loads_local_weights(tmp_path):
    with pytest.raises(DataError, match="known families"):
        build("resnet", 10)
    with pytest.raises(DataError, match="unknown option"):
        build("mnet", 10, {"alpah": 10})
    with pytest.raises(DataError, match="file not found"):
        build("mnet", 10, {"weights": str(tmp_path / "none.pt")})
    from torchvision.models import mobilenet_v2

    ref = mobilenet_v2(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mbv2.pt")
    m = build("mnet", 10, {"weights": str(tmp_path / "mbv2.pt"), "branch_blocks": 5})
    assert torch.equal(m.back[3].conv[0][0].weight, ref.features[3].conv[0][0].weight)
    assert torch.equal(m.fore[0][0].weight, ref.features[0][0].weight)
