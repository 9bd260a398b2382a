"""A linear probe on `navit embed` outputs (run by hand; numbers go in docs/use.md and the README).

Fits multinomial logistic regression (torch, full-batch L-BFGS, standardised features, small L2) on
the training images' embeddings and reports top-1 on the held-out images' embeddings; also the
top-1 of the model's own head, read from the same files (``topk_ids[0]``).

    navit embed runs/demo data/aspect --out train.parquet
    navit embed runs/demo data/heldout --out heldout.parquet
    .venv/bin/python benchmarks/linear_probe.py train.parquet heldout.parquet
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import torch


def load(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    t = pq.read_table(path)
    t = t.filter(t["ok"])
    x = np.array(t["embedding"].to_pylist(), np.float32)
    y = t["label"].to_numpy()
    top = t["topk_ids"].to_pylist()
    head = np.array([k[0] for k in top]) if top and top[0] else None
    return x, y, head


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 200) -> tuple[torch.nn.Linear, tuple]:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y).long()
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin, (mu, sd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("heldout")
    ap.add_argument("--l2", type=float, default=1e-4)
    a = ap.parse_args()
    torch.manual_seed(0)
    xtr, ytr, _ = load(a.train)
    xte, yte, head = load(a.heldout)
    lin, (mu, sd) = fit_probe(xtr, ytr, a.l2)
    with torch.no_grad():
        pred = lin(torch.from_numpy((xte - mu) / sd)).argmax(-1).numpy()
        train_pred = lin(torch.from_numpy((xtr - mu) / sd)).argmax(-1).numpy()
    print(f"train images {len(ytr)}, held-out images {len(yte)}, embedding dim {xtr.shape[1]}")
    train_acc, heldout_acc = np.mean(train_pred == ytr), np.mean(pred == yte)
    print(f"linear probe: train top-1 {train_acc:.3f}, held-out top-1 {heldout_acc:.3f}")
    if head is not None:
        print(f"the model's own head: held-out top-1 {np.mean(head == yte):.3f}")


if __name__ == "__main__":
    main()
