"""Plan Llama-2-70B on HexGen's clusters and compare with symmetric and hand-made plans.

    python examples/plan_hexgen.py [--out DIR]

For HexGen's eight uneven GPUs (4×A6000, 2×A5000, 2×A4000) it prints the
best asymmetric plan the search finds, the best symmetric plan (one tp for
every stage, layers split evenly) and HexGen's hand plan (TP 4/2/2 with
layers 44/20/16), for a decode-heavy and a prefill-heavy workload, and draws
them side by side. Then it plans the same model on HexGen's half- and
full-budget clusters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from hexjax.cluster import Cluster
from hexjax.models.config import ModelConfig
from hexjax.search import cost, plan
from hexjax.search.baselines import hexgen_hand_plan, symmetric_plan
from hexjax.search.draw import draw
from hexjax.search.report import table, totals_text
from hexjax.workload import Workload

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("plan_hexgen_out"), help="where the pictures go")
    args = ap.parse_args()
    con = Console(width=130)
    cfg = ModelConfig.preset("llama-2-70b")
    c8 = Cluster.load(HERE / "clusters/hexgen-8gpu.toml")

    for label, wl in (("decode-heavy", Workload(prompt_len=512, output_len=128, batch=64)),
                      ("prefill-heavy", Workload(prompt_len=1024, output_len=32, batch=16))):
        con.rule(f"{cfg.name} on {c8.name}, {label}: prompt {wl.prompt_len}, output {wl.output_len}, "
                 f"batch {wl.batch}")
        plans = [("asymmetric (searched)", plan(cfg, c8, wl, "throughput")),
                 ("best symmetric", symmetric_plan(cfg, c8, wl, "throughput")),
                 ("HexGen's hand plan", hexgen_hand_plan(c8, wl))]
        preds = []
        for title, p in plans:
            pred = cost.predict(p, cfg, c8, wl)
            preds.append(pred)
            con.print(table(p, pred, c8, title=title))
            con.print(totals_text(p, pred, c8))
            if not pred.fits:
                con.print("[red]does not fit in memory for this workload[/]")
            con.print()
        path = draw(plans, c8, args.out / f"hexgen-8gpu-{label}.png", preds)
        con.print(f"wrote {path}")

    wl = Workload(prompt_len=512, output_len=128, batch=16)
    for name in ("hexgen-half", "hexgen-full"):
        cluster = Cluster.load(HERE / f"clusters/{name}.toml")
        con.rule(f"{cfg.name} on {name} ({cluster.num_devices} GPUs), batch {wl.batch}")
        for objective in ("latency", "throughput"):
            p = plan(cfg, cluster, wl, objective)
            pred = cost.predict(p, cfg, cluster, wl)
            con.print(table(p, pred, cluster, title=f"best for {objective}"))
            con.print(totals_text(p, pred, cluster))
            path = draw([(f"{name}: best for {objective}", p)], cluster, args.out / f"{name}-{objective}.png", [pred])
            con.print(f"wrote {path}\n")


if __name__ == "__main__":
    main()
