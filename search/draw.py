"""Draw a plan over its cluster: hosts as boxes of devices, replicas and stages in colour."""

from __future__ import annotations

from pathlib import Path


def draw(plans: list[tuple[str, object]], cluster, path: str | Path, predictions: list | None = None) -> Path:
    """Write one panel per ``(title, plan)`` to ``path`` (``.svg`` or ``.png``).

    Each host is a box labelled with its name, device type and zone; each
    device a square. A replica has one colour; its stages alternate shades
    and carry ``S<stage>`` and the layer range. Idle devices stay grey.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    path = Path(path)
    hosts = cluster.hosts
    per_row = max(h.count for h in hosts)
    cols = min(per_row, 8)
    host_rows = [-(-h.count // cols) for h in hosts]
    height = sum(host_rows) + 0.9 * len(hosts)
    fig, axes = plt.subplots(1, len(plans), figsize=(max(3.6, 0.62 * cols + 1.4) * len(plans), 0.55 * height + 1.6),
                             squeeze=False)
    cmap = colormaps["tab20"]
    for k, (title, plan) in enumerate(plans):
        ax = axes[0][k]
        owner = {}
        for i, rep in enumerate(plan.replicas):
            for j, st in enumerate(rep.stages):
                for d in st.devices:
                    owner[d] = (i, j, st)
        y = 0.0
        for h, rows in zip(hosts, host_rows):
            top = y
            ax.text(-0.15, y - 0.05, f"{h.name}  ({h.count}× {h.device.name}, {h.zone})", fontsize=7.5,
                    va="top", ha="left", family="monospace")
            y -= 0.35
            for n, d in enumerate(h.devices):
                r, c = divmod(n, cols)
                x0, y0 = c, y - r - 0.9
                if d in owner:
                    i, j, st = owner[d]
                    base = cmap((2 * i) % 20)
                    shade = cmap((2 * i + (j % 2)) % 20)
                    face = shade if j % 2 else base
                    label = f"R{i}S{j}\nL{st.layers[0]}-{st.layers[1] - 1}\n{st.dp}×{st.tp}"
                else:
                    face, label = "#e6e6e6", "idle"
                ax.add_patch(Rectangle((x0, y0), 0.92, 0.85, facecolor=face, edgecolor="#333333", lw=0.6))
                ax.text(x0 + 0.46, y0 + 0.42, label, fontsize=5.5, ha="center", va="center")
            y -= rows + 0.55
            ax.add_patch(Rectangle((-0.2, y + 0.2), cols + 0.3, top - y - 0.15, fill=False, edgecolor="#777777",
                                   lw=0.8, ls="--"))
        sub = title
        if predictions and predictions[k] is not None:
            p = predictions[k]
            sub += (f"\n{p.throughput_tokens_per_s:,.0f} tok/s, latency {p.latency_s:.2f} s, "
                    f"${p.price_per_hour:.2f}/h" + ("" if p.fits else "\nDOES NOT FIT IN MEMORY"))
        ax.set_title(sub, fontsize=9)
        ax.set_xlim(-0.3, cols + 0.2)
        ax.set_ylim(y, 0.3)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150 if path.suffix.lower() == ".png" else None)
    plt.close(fig)
    return path
