"""The per-footprint branch and bound against every order and layer split, on a real model's 32 layers."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from hexjax.cluster import Cluster
from hexjax.models.config import ModelConfig
from hexjax.search.space import host_classes
from hexjax.search.train_search import Constraints, TrainPipelines
from hexjax.workload import TrainWorkload

ROOT = Path(__file__).resolve().parents[1]


def _splits(total: int, parts: int) -> np.ndarray:
    return np.array([np.diff((0,) + cuts + (total,)) for cuts in itertools.combinations(range(1, total), parts - 1)])


def test_microbatched_pipeline_search_matches_every_split():
    # T = Σ w + (M - 1) max w grows with every stage's w, so at a fixed order and split each stage's fastest
    # shape is best, and the least over all orders and splits is the optimum the search must reach
    cfg = ModelConfig.preset("llama-2-7b")
    cluster = Cluster.load(ROOT / "examples/clusters/hexgen-full.toml")
    sym = host_classes(cluster)
    wl = TrainWorkload(seq_len=4096, global_batch=32, remat="full")
    search = TrainPipelines(cfg, cluster, sym, wl, Constraints())
    rnd = random.Random(0)
    L, checked = cfg.num_layers, 0
    while checked < 80:
        P = rnd.choice([3, 4])
        hosts = rnd.sample([k for k in sym.classes for _ in k.hosts], P)        # a piece per host
        fp = tuple(sorted((k.index, rnd.randint(1, k.count)) for k in hosts))
        for M, b in ((4, 1), (8, 2), (32, 1)):
            table = search._table(fp, M, b)
            if table is None:
                continue
            _, _, W = table
            K = _splits(L, P)
            w = np.stack([W[j][:, K[:, j]] for j in range(P)])             # [stage, order, split]
            T = float((w.sum(axis=0) + (M - 1) * w.max(axis=0)).min())
            got = search.best(fp, M, b)
            if not np.isfinite(T):
                assert got is None, (fp, M, b)
                continue
            assert got is not None and got.step_s == pytest.approx(T, rel=1e-12), (fp, M, b, got, T)
            # and nothing below the optimum is claimed once it is the limit
            assert search.best(fp, M, b, limit=T * (1 - 1e-9)) is None
            checked += 1
