"""The TMCR head's options that are not the paper's: the CR branch reading E_CR's input
(``cr_features: input``) and PCA-whitened TM features (``tm_whiten``). Off by default, the
head is the one it was (same parameters, same buffers, same outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.heads.build import head_from_arch
from pipelines.heads.model import TMCRHead, pca_whitener
from pipelines.ranking.encoder import CREncoder


def correlated_tm(n: int = 2000, d: int = 12, seed: int = 0) -> torch.Tensor:
    """TM-like features: large offsets, one dominant shared direction (badly conditioned)."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((n, 1)) * 5
    x = 30 + common @ rng.standard_normal((1, d)) + 0.3 * rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d)
    return torch.from_numpy(x.astype(np.float32))


def test_defaults_keep_the_paper_head():
    torch.manual_seed(0)
    enc = CREncoder(6, hidden=8, dim=4)
    head = TMCRHead(5, 10, enc, tm_dim=3, cr_dim=3, hidden=7)
    assert "tm_white" not in head.state_dict()  # old model files load unchanged
    assert head.cr_proj.in_features == 4  # the constructor's default: E_CR's output z
    tm = correlated_tm(50, 5)
    head.fit_normaliser(lambda: iter(tm.split(16)))
    torch.testing.assert_close(head.normalise_tm(tm), (tm - tm.mean(0)) / tm.std(0), rtol=1e-4, atol=1e-4)


def test_cr_branch_reads_the_embedding_and_leaves_e_cr_frozen():
    torch.manual_seed(0)
    enc = CREncoder(6, hidden=8, dim=4)
    for protocol_fine_tune in (False, True):
        head = TMCRHead(5, 10, enc, tm_dim=3, cr_dim=3, hidden=7, cr_features="input", fine_tune=protocol_fine_tune)
        assert head.cr_proj.in_features == 6
        assert not any(p.requires_grad for p in head.cr.parameters())
        emb = torch.randn(4, 6)
        fused = head.fuse(torch.randn(4, 5), emb)
        torch.testing.assert_close(fused[:, 3:], head.cr_proj(emb))  # the embedding itself, projected
    with pytest.raises(ValueError, match="cr_features"):
        TMCRHead(5, 10, enc, cr_features="pixels")


def test_head_from_arch_builds_and_reloads_the_input_branch():
    enc = CREncoder(6, hidden=8, dim=4)
    h = {"tm_dim": 3, "cr_dim": 3, "hidden": 7, "dropout": 0.0, "use_tm": True, "use_cr": True,
         "protocol": "linear_probe", "cr_features": "input"}
    arch = {"tm_in": 5, "n_levels": 10, "cr_spec": enc.spec(), "head": h}
    a = head_from_arch(arch)
    b = head_from_arch(arch)
    b.load_state_dict(a.state_dict())
    x, e = torch.randn(3, 5), torch.randn(3, 6)
    torch.testing.assert_close(a.eval()(x, e), b.eval()(x, e))


def test_whitened_tm_has_identity_covariance_and_streams_like_one_pass():
    tm = correlated_tm()
    head = TMCRHead(tm.shape[1], 10, None, use_cr=False, tm_whiten=True, tm_whiten_eps=1e-6)
    head.fit_normaliser(lambda: iter(tm.split(300)))
    z = head.normalise_tm(tm).double()
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.eye(tm.shape[1], dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(head.tm_std, tm.std(0), rtol=1e-4, atol=1e-5)  # the per-dimension statistics are unchanged
    # the first direction carries most of the raw correlation: whitening is what spreads it
    corr = torch.corrcoef(tm.double().T)
    assert torch.linalg.eigvalsh(corr)[-1] / tm.shape[1] > 0.5
    # shrinkage: a near-empty direction is scaled by at most 1 / sqrt(eps * mean eigenvalue)
    w = pca_whitener(torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64)), 0.01)
    assert w.abs().max() <= (1 / np.sqrt(0.01 * 0.5)) + 1e-3
    # in the state dict, so a reloaded head whitens as the trained one did
    two = TMCRHead(tm.shape[1], 10, None, use_cr=False, tm_whiten=True)
    two.load_state_dict(head.state_dict())
    torch.testing.assert_close(two.normalise_tm(tm), head.normalise_tm(tm))


def test_whitening_under_an_all_reduce_equals_one_worker():
    tm = correlated_tm(1000, 7, seed=3)
    one = TMCRHead(7, 10, None, use_cr=False, tm_whiten=True)
    one.fit_normaliser(lambda: iter(tm.split(128)))
    mine, other = tm[:400].double(), tm[400:].double()
    calls = []

    def all_reduce(t: torch.Tensor) -> None:  # worker 1's contribution from the other shard
        if not calls:
            t += torch.cat([other.sum(0), torch.tensor([float(len(other))], dtype=torch.float64)])
            calls.append(t[:-1] / t[-1])
        else:
            dev = other - calls[0]
            t += dev.T @ dev

    two = TMCRHead(7, 10, None, use_cr=False, tm_whiten=True)
    two.fit_normaliser(lambda: iter(mine.float().split(64)), all_reduce)
    torch.testing.assert_close(two.tm_white, one.tm_white, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two.tm_std, one.tm_std)
