"""The unlabelled term of self-training, ELTA eq. 10, for the head / self-training loop.

``L_u = (1 / B_u) sum_{i=1..B_u} 1[max y^_i(beta*) >= t*] H(y^_i, f(x_i))``: a batch of ``B_u``
rows is drawn from the WHOLE unlabelled pool, and the rows APDS did not select contribute zero
to a mean over all ``B_u``. So ``L_u`` shrinks with the selection's coverage; keeping only the
selected rows and averaging over them would inflate it by ``1 / coverage`` (5x at a 20 % floor).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from pipelines.heads.losses import masked_mean_loss


def load_pseudo_pool(pseudo_path, read: Callable[[np.ndarray], tuple[np.ndarray, tuple[np.ndarray, ...]]]
                     ) -> dict[str, torch.Tensor] | None:
    """The rows of the pseudo-label table (``pseudo_search``'s output), selected or not, that
    ``read`` picks: this worker's share of the pool.

    ``read(image_id)`` gets the table's ids and returns the positions it keeps (all of them for
    one worker) and those rows' model inputs (row-aligned arrays: the CLIP embedding for TM, and
    E_CR's input). Returns ``None`` when APDS selected no row (then eq. 10's ``L_u`` is
    identically 0).
    """
    p = pd.read_parquet(pseudo_path)
    if not len(p) or not p["selected"].any():
        return None
    rows, inputs = read(p["image_id"].to_numpy(dtype=object))
    p = p.iloc[rows]
    return {
        "inputs": tuple(torch.from_numpy(x) for x in inputs),
        "dist": torch.from_numpy(np.stack(p["pseudo_dist"].to_numpy()).astype(np.float32)),
        "selected": torch.from_numpy(p["selected"].to_numpy(dtype=bool, copy=True)),
    }


def unlabeled_loss(
    pool: dict[str, torch.Tensor],
    logits_fn: Callable[..., torch.Tensor],
    dist_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """ELTA eq. 10 on one batch of ``min(batch_size, len(pool))`` rows drawn from the whole pool.

    ``pool``: ``inputs`` (a tuple of row-aligned tensors), ``dist`` (the APDS-sharpened pseudo
    labels) and ``selected`` (bool), as ``load_pseudo_pool`` returns them. ``logits_fn(*inputs)``
    is the model; ``dist_loss(pred, target)`` a batch-mean loss H (EMD
    or Re-EMD). Only the selected rows are run through the model; their mean loss is scaled by
    ``n_selected / B_u``, which is eq. 10's mean over all ``B_u`` rows with zeros for the rest.
    """
    n = len(pool["selected"])
    rows = torch.randint(n, (min(batch_size, n),), generator=generator)
    mask = pool["selected"][rows]
    take = rows[mask]
    if not len(take):
        return torch.zeros((), device=device)
    pred = torch.softmax(logits_fn(*(x[take].to(device) for x in pool["inputs"])), 1)
    return masked_mean_loss(dist_loss, pred, pool["dist"][take].to(device), n_total=len(rows))
