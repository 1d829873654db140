"""Frozen-feature probes: the quick read on a pretraining run, minutes instead of a fine-tuning run.

Both probes see the backbone's globally pooled stride-32 features ([N, C], from timm's
`forward_features`) of centre crops, computed once with the backbone frozen in eval mode:
- k-NN (DINO / iBOT): L2-normalised features, cosine similarity to every training image, the k
  nearest vote for their class with weight exp(similarity / T);
- linear (MAE): BatchNorm1d without affine (eps 1e-6) + Linear, trained with SGD (momentum 0.9) on
  the stored features; MAE uses LARS at batch 16384, which at small batches is SGD with momentum.
Runs in one process (feature extraction is a single inference pass over the data).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from spark_me.data.labelled import LabelledImages, find_splits
from spark_me.engine.distributed import DistEnv
from spark_me.engine.probe_config import ProbeConfig
from spark_me.engine.transfer import create_model, read_source, val_transform

log = logging.getLogger("spark_me.probe")


@torch.no_grad()
def pooled_features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """(features [N, C] float32 on the CPU, labels [N]) of the whole loader."""
    model.eval()
    feats, labels = [], []
    for images, targets in loader:
        maps = model.forward_features(images.to(device))  # [B, C, H/32, W/32]
        feats.append(maps.float().mean((2, 3)).cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def topk_hits(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent of class scores [N, K] against labels [N]."""
    k = min(5, scores.shape[1])
    hits = scores.topk(k, dim=1).indices.eq(labels[:, None])
    return 100 * float(hits[:, 0].float().mean()), 100 * float(hits.any(1).float().mean())


@torch.no_grad()
def knn_scores(
    train: Tensor, train_labels: Tensor, query: Tensor, num_classes: int, k: int = 20, t: float = 0.07
) -> Tensor:
    """Class votes [Nq, K] of each query [Nq, C] from its k nearest training features [Nt, C]."""
    train, query = F.normalize(train, dim=1), F.normalize(query, dim=1)
    k = min(k, len(train))
    votes = []
    for chunk in query.split(1024):
        sim, idx = (chunk @ train.T).topk(k, dim=1)  # cosine similarities [n, k]
        weights = (sim / t).exp()
        votes.append(torch.zeros(len(chunk), num_classes).scatter_add_(1, train_labels[idx], weights))
    return torch.cat(votes)


def linear_probe(train: Tensor, train_labels: Tensor, num_classes: int, cfg: ProbeConfig) -> nn.Sequential:
    """MAE's probe head trained on stored features [N, C] (shuffled batches, cosine lr with warmup)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    width = train.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, num_classes))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=gen)  # MAE: std 0.01, bias 0
        head[1].bias.zero_()
    batch = min(cfg.batch_size, len(train))
    lr = cfg.blr * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train) // batch
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1) * steps_per_epoch
    sched = CosineLRScheduler(
        optimizer, t_initial=cfg.epochs * steps_per_epoch - warmup, warmup_t=warmup, warmup_prefix=True,
        warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False,
    )  # fmt: skip
    head.train()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            sched.step_update(num_updates=step)
            loss = F.cross_entropy(head(train[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    return head


def run(cfg: ProbeConfig) -> int:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = DistEnv(device=device)
    splits = find_splits(cfg.data_path)
    source = read_source(cfg.weights, cfg.arch)
    model, _ = create_model(cfg.arch, 0, cfg.model_kwargs, source)
    transform = val_transform(cfg.input_size, cfg.crop_pct)
    sets = {s: LabelledImages(splits, s, transform) for s in ("train", "val")}
    model.to(env.device)
    feats = {
        s: pooled_features(model, DataLoader(d, cfg.batch_size, num_workers=cfg.num_workers), device)
        for s, d in sets.items()
    }
    (train, train_labels), (val, val_labels) = feats["train"], feats["val"]
    num_classes = len(splits.classes)
    if cfg.method == "knn":
        scores = knn_scores(train, train_labels, val, num_classes, cfg.knn_k, cfg.knn_t)
        detail = f"k={min(cfg.knn_k, len(train))}, T={cfg.knn_t}"
    else:
        head = linear_probe(train, train_labels, num_classes, cfg)
        with torch.no_grad():
            scores = head(val)
        detail = f"{cfg.epochs} epochs, lr {cfg.blr * min(cfg.batch_size, len(train)) / 256:.3g}"
    top1, top5 = topk_hits(scores, val_labels)
    chance = 100 * float(torch.bincount(val_labels, minlength=num_classes).max()) / len(val_labels)
    log.info(
        "%s probe of %s (%s) on %s: top-1 %.2f%%  top-5 %.2f%%  (%d features of width %d; "
        "majority class %.2f%%)",
        cfg.method,
        cfg.weights or "random initialisation",
        detail,
        cfg.data_path,
        top1,
        top5,
        len(train),
        train.shape[1],
        chance,
    )
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record = {"method": cfg.method, "weights": cfg.weights, "arch": cfg.arch, "top1": top1, "top5": top5}
    with open(output / "log.txt", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return 0
