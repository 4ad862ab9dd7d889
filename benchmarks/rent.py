"""What renting a mix of device types saves: the cheapest rental for three request mixes, against the best
single device type and against renting every device on offer (e.g. all of hexgen-full).

    python benchmarks/rent.py [--model llama-2-7b] [--rate 4] [--slo 30] [--offers examples/offers/cloud.toml ...]

Everything here is the cost model's prediction (no device runs); the search is exact over its plan space
(see search/rent.py), so the savings are those of the model, not measured ones.
"""

from __future__ import annotations

import argparse
import time

MIXES = {
    # short chat turns, as in conversational traces
    "conversational": [(128, 128, 0.5), (512, 256, 0.35), (1024, 256, 0.15)],
    # summarising long documents
    "long-document": [(1536, 256, 0.3), (2560, 256, 0.4), (3584, 384, 0.3)],
    # half of each
    "mixed": [(128, 128, 0.25), (512, 256, 0.175), (1024, 256, 0.075),
              (1536, 256, 0.15), (2560, 256, 0.2), (3584, 384, 0.15)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s")
    ap.add_argument("--slo", type=float, default=30.0, help="end-to-end latency bound, seconds")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--offers", nargs="+", default=["examples/offers/cloud.toml", "examples/offers/hexgen-full.toml"])
    ap.add_argument("--mixes", default=",".join(MIXES))
    args = ap.parse_args()

    from hexjax.errors import PlanError
    from hexjax.search.rent import Bucket, load_offers, price_all, rent

    batches = tuple(int(b) for b in args.batches.split(","))
    print(f"model {args.model}, {args.rate:g} requests/s, SLO {args.slo:g} s end to end, batch sizes {batches}")
    for path in args.offers:
        offers = load_offers(path)
        types = sorted({o.device for o in offers.offers})
        print(f"\n== {offers.name} ({path}): {offers.cluster.num_devices} devices on offer, "
              f"${price_all(offers):.2f}/h for all of them; types {', '.join(types)}")
        for mix_name in args.mixes.split(","):
            mix = [Bucket(p, o, s) for p, o, s in MIXES[mix_name]]
            t0 = time.perf_counter()
            try:
                best = rent(args.model, offers, mix, args.rate, args.slo, batches)
            except PlanError as e:
                print(f"{mix_name:15s} no rental serves it: {e}")
                continue
            singles = {}
            for dev in types:
                try:
                    singles[dev] = rent(args.model, offers.restricted(lambda k, o: o.device == dev), mix,
                                        args.rate, args.slo, batches).price_per_hour
                except PlanError:
                    singles[dev] = float("inf")
            single_dev = min(singles, key=singles.get)
            single = singles[single_dev]
            rented = ", ".join(f"{n} {o.device}@{o.zone}" for o, n in zip(offers.offers, best.devices) if n)
            vs_single = (f"{1 - best.price_per_hour / single:.0%} cheaper than the best single type "
                         f"({single_dev}, ${single:.2f}/h)" if single < float("inf") else "no single type serves it")
            print(f"{mix_name:15s} ${best.price_per_hour:6.2f}/h: {rented}; {vs_single}; "
                  f"{1 - best.price_per_hour / price_all(offers):.0%} cheaper than renting everything "
                  f"(${price_all(offers):.2f}/h); {time.perf_counter() - t0:.1f} s")
            print(" " * 16 + "single types: " + ", ".join(
                f"{d} ${p:.2f}/h" if p < float("inf") else f"{d} -" for d, p in singles.items()))


if __name__ == "__main__":
    main()
