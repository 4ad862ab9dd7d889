"""What renting a mix of device types saves (Mélange's question): the cheapest rental for a request-size trace
at several rates and time-per-output-token SLOs, against renting one device type only.

    python benchmarks/rent.py [--model llama-2-7b] [--offers examples/offers/melange.toml ...]
        [--traces conversational,long-document,mixed] [--rates 1,2,4,8,16] [--tpot-ms 120,40]

Per offers file, trace and SLO it prints, per rate, the $/h of: the mix (replicas may serve several request
sizes, time divided among them, as Mélange packs slices of a workload onto GPUs); the same with one request
size per replica (``rent(share=False)``); each single device type (with sharing). Then the saving of the mix
against the best and the worst single type at that rate, and against renting everything on offer. Mélange's
headline figures ("up to 77%") are its largest saving against any single-type baseline over its rates, so
the worst-type column is the one comparable with them.

The request mix is the trace cut into ``--buckets`` groups of equal count (``mix_from_trace``). Everything is
the cost model's prediction from datasheet figures (no device runs); the search is exact over its plan space
(see search/rent.py), so the savings are those of the model, not measured ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--offers", nargs="+", default=["examples/offers/melange.toml"])
    ap.add_argument("--traces", default="conversational,long-document,mixed",
                    help="names in examples/traces/ or paths to .jsonl files")
    ap.add_argument("--buckets", type=int, default=6, help="request-size buckets cut from each trace")
    ap.add_argument("--rates", default="1,2,4,8,16", help="requests/s")
    ap.add_argument("--tpot-ms", default="120,40", help="time-per-output-token SLOs (ms); 0: none")
    ap.add_argument("--slo", type=float, default=None, help="end-to-end latency bound, seconds (default none)")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--max-stages", type=int, default=1, help="pipeline stages per replica (1: each replica on one "
                                                               "machine, as Mélange serves; more is slower to solve)")
    args = ap.parse_args()

    from hexjax.errors import PlanError
    from hexjax.search.rent import load_offers, mix_from_trace, price_all, rent_rates
    from hexjax.trace import load_trace

    batches = tuple(int(b) for b in args.batches.split(","))
    rates = [float(r) for r in args.rates.split(",")]
    tpots = [float(t) / 1e3 if float(t) > 0 else None for t in args.tpot_ms.split(",")]
    print(f"model {args.model}; rates {', '.join(f'{r:g}' for r in rates)} requests/s; batch sizes {batches}; "
          f"at most {args.max_stages} pipeline stage(s) per replica; "
          f"end-to-end SLO {f'{args.slo:g} s' if args.slo else 'none'}")
    for path in args.offers:
        offers = load_offers(ROOT / path if not Path(path).is_absolute() else path)
        types = sorted({o.device for o in offers.offers})
        prices = {o.device: offers.cluster.hosts[offers.offer_of_host.index(k)].device.price_per_hour
                  for k, o in enumerate(offers.offers)}
        print(f"\n== {offers.name} ({path}): {offers.cluster.num_devices} devices on offer "
              f"(${price_all(offers):.2f}/h for all); " + ", ".join(f"{d} ${prices[d]:.2f}/h" for d in types))
        for name in args.traces.split(","):
            tpath = Path(name) if name.endswith(".jsonl") else ROOT / f"examples/traces/{name}.jsonl"
            trace = load_trace(tpath)
            mix = mix_from_trace(trace, args.buckets)
            sizes = ", ".join(f"{b.prompt_len}/{b.output_len}" for b in mix)
            for tpot in tpots:
                t0 = time.perf_counter()

                def run(o, share=True):
                    return rent_rates(args.model, o, mix, rates, args.slo, batches, args.max_stages, share=share,
                                      tpot_slo_s=tpot)

                def priced(o, share=True):
                    try:
                        return [r.price_per_hour if not isinstance(r, PlanError) else float("inf")
                                for r in run(o, share)]
                    except PlanError:
                        return [float("inf")] * len(rates)

                try:
                    best = run(offers)
                except PlanError as e:
                    print(f"-- {trace.name}, TPOT {tpot and tpot * 1e3:g} ms: no rental serves it: {e}")
                    continue
                split = priced(offers, share=False)
                singles = {d: priced(offers.restricted(lambda k, o, d=d: o.device == d)) for d in types}
                slo_txt = f"TPOT <= {tpot * 1e3:g} ms" if tpot else "no TPOT bound"
                print(f"\n-- {trace.name} ({len(trace)} requests; buckets prompt/output {sizes}), {slo_txt}")
                print(f"   {'req/s':>6s}  {'mix $/h':>8s}  {'1 size/rep':>10s}  "
                      + "  ".join(f"{d:>9s}" for d in types)
                      + f"  {'vs best':>8s}  {'vs worst':>8s}  {'vs all':>7s}  mix uses")
                for k, rate in enumerate(rates):
                    r = best[k]
                    single = [singles[d][k] for d in types]
                    fmt = lambda v: f"{v:9.2f}" if v < float("inf") else f"{'-':>9s}"
                    if isinstance(r, PlanError):
                        print(f"   {rate:6g}  {'-':>8s}  {fmt(split[k]):>10s}  " + "  ".join(fmt(v) for v in single))
                        continue
                    ok = [v for v in single if v < float("inf")]
                    vs_best = f"{1 - r.price_per_hour / min(ok):8.0%}" if ok else f"{'-':>8s}"
                    vs_worst = f"{1 - r.price_per_hour / max(ok):8.0%}" if ok else f"{'-':>8s}"
                    used: dict = {}
                    for o, n in zip(offers.offers, r.devices):
                        used[o.device] = used.get(o.device, 0) + n
                    print(f"   {rate:6g}  {r.price_per_hour:8.2f}  {fmt(split[k]):>10s}  "
                          + "  ".join(fmt(v) for v in single) + f"  {vs_best}  {vs_worst}  "
                          + f"{1 - r.price_per_hour / price_all(offers):7.0%}  "
                          + ", ".join(f"{n} {d}" for d, n in used.items() if n))
                print(f"   ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
