"""Cost model on paper: all-reduce across N nodes x 8 GPUs with 400 Gb/s InfiniBand (docs/HIERARCHICAL.md).

An alpha-beta model (time = synchronised steps x latency + bytes / bandwidth) of NCCL's ring and
tree against shardkit's hierarchical all-reduce (collectives/hierarchical.py), "sharded" (copy-engine
reduce-scatter in the node, all-reduce of 1/8 of the message on each rail, copy-engine all-gather;
pipelined by chunk, or as three sequential phases) and "full" (all-reduce in the node, then the
whole message on every rail). No measurement: the parameters are the ``Fabric`` defaults below.

    python bench/hierarchical_cost_model.py [--plot docs/hierarchical_model.png]

prints the markdown table of docs/HIERARCHICAL.md (and draws the plot).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class Fabric:
    """Per GPU, per direction; GB/s and microseconds."""
    gpus: int = 8                   # L, GPUs (and 400 Gb/s NICs, one per GPU, rail-optimised) per node
    nvlink: float = 370.0           # NVLink by SM copies (NCCL's ring peaks near 370 on H200: DESIGN.md)
    copy_engine: float = 389.0      # NVLink by copy engines (measured on 2xH200; assumed to hold on 8)
    ib: float = 45.0                # one 400 Gb/s NIC = 50 GB/s, at 90%
    alpha_nv: float = 2.0           # one synchronised step inside a node (a barrier, a ring hop)
    alpha_ib: float = 6.0           # one step across nodes (NCCL over IB, per ring hop / tree level)
    copy_op: float = 2.0            # fixed cost of one copy-engine transfer (serial on the side stream)


def _bw_us(nbytes: float, gbps: float) -> float:
    return nbytes / (gbps * 1e3)  # bytes / (GB/s) in microseconds


def nccl_ring(n: int, nodes: int, f: Fabric) -> float:
    """Flat ring over P = N L GPUs, L rings (one per NIC): each GPU sends 2(P-1)/P n, 1/L of it over
    its NIC (the ring's node crossing) and (L-1)/L over NVLink; every step waits for the IB hop."""
    p = nodes * f.gpus
    traffic = 2 * (p - 1) / p * n
    if nodes == 1:
        return 2 * (p - 1) * f.alpha_nv + _bw_us(traffic, f.nvlink)
    per_gpu = max(_bw_us(traffic / f.gpus, f.ib), _bw_us(traffic * (f.gpus - 1) / f.gpus, f.nvlink))
    return 2 * (p - 1) * f.alpha_ib + per_gpu


def nccl_tree(n: int, nodes: int, f: Fabric) -> float:
    """NCCL's two-level tree: a chain through the node's GPUs, a double binary tree across nodes
    (each tree carries n/2; reduce and broadcast pipelined): per node about 2n each way across its
    L NICs; each GPU of the chain sends n up (reduce) and n down (broadcast) over NVLink; latency
    of the chain and 2 log2 N tree levels."""
    if nodes == 1:
        return nccl_ring(n, 1, f)
    levels = math.ceil(math.log2(nodes))
    return (2 * (f.gpus - 1) * f.alpha_nv + 2 * levels * f.alpha_ib
            + max(_bw_us(2 * n / f.gpus, f.ib), _bw_us(2 * n, f.nvlink)))


def rail_all_reduce(s: float, nodes: int, f: Fabric) -> tuple[float, float]:
    """(latency, bandwidth time) of NCCL's all-reduce of s bytes on one rail (one GPU and NIC per
    node), the faster of ring and tree."""
    if nodes == 1:
        return 0.0, 0.0
    levels = math.ceil(math.log2(nodes))
    ring = (2 * (nodes - 1) * f.alpha_ib, _bw_us(2 * (nodes - 1) / nodes * s, f.ib))
    tree = (2 * levels * f.alpha_ib, _bw_us(2 * s, f.ib))
    return min(ring, tree, key=sum)


def shardkit_sharded(n: int, nodes: int, f: Fabric, pipelined: bool = True) -> float:
    """Copy-engine reduce-scatter + all-gather in the node (2(L-1)/L n over NVLink; 2(L-1) transfers
    per chunk, each with a fixed cost), the rail's all-reduce of the n/L shard. Pipelined over K
    chunks (the shard hook runs per chunk: K rail all-reduces, each paying the rail latency): the
    slower phase plus one chunk of the other."""
    shard = n / f.gpus
    chunks = max(1, min(8, math.ceil(shard / (8 * MIB))))
    intra = _bw_us(2 * (f.gpus - 1) / f.gpus * n, f.copy_engine)
    lat, inter = rail_all_reduce(shard / chunks if pipelined else shard, nodes, f)
    sync = (chunks + 2) * f.alpha_nv + 2 * (f.gpus - 1) * chunks * f.copy_op  # barriers, transfers' fixed cost
    if not pipelined:
        return sync + intra + lat + inter
    inter_total = chunks * lat + rail_all_reduce(shard, nodes, f)[1]
    return sync + max(intra, inter_total) + min(intra, inter_total) / chunks


def shardkit_full(n: int, nodes: int, f: Fabric) -> float:
    """All-reduce in the node (one-shot flat: (L-1) n read per GPU; or two-shot), then the whole
    message on every rail at once (each NIC carries its rail's all-reduce of n)."""
    flat = 2 * f.alpha_nv + _bw_us((f.gpus - 1) * n, f.nvlink)
    two_shot = 3 * f.alpha_nv + _bw_us(2 * (f.gpus - 1) / f.gpus * n, f.nvlink)
    return min(flat, two_shot) + sum(rail_all_reduce(n, nodes, f))


def table(sizes: list[int], node_counts: list[int], f: Fabric) -> str:
    rows = ["| size | nodes | NCCL ring | NCCL tree | sharded (pipelined) | sharded (3 phases) | full "
            "| best NCCL / best shardkit |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for nodes in node_counts:
            ring, tree = nccl_ring(n, nodes, f), nccl_tree(n, nodes, f)
            pipe, seq = shardkit_sharded(n, nodes, f), shardkit_sharded(n, nodes, f, False)
            full = shardkit_full(n, nodes, f)
            rows.append(f"| {human(n)} | {nodes} | {ring:,.0f} | {tree:,.0f} | {pipe:,.0f} | {seq:,.0f} | "
                        f"{full:,.0f} | {min(ring, tree) / min(pipe, full):.2f} |")
    return "\n".join(rows)


def human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


def plot(path: str, node_counts: list[int], f: Fabric) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(2 ** e) for e in range(14, 31)]
    fig, axes = plt.subplots(1, len(node_counts), figsize=(5 * len(node_counts), 4), sharey=True)
    for ax, nodes in zip(axes, node_counts):
        best = [min(nccl_ring(n, nodes, f), nccl_tree(n, nodes, f)) for n in sizes]
        for name, fn in (("NCCL ring", lambda n: nccl_ring(n, nodes, f)),
                         ("NCCL tree", lambda n: nccl_tree(n, nodes, f)),
                         ("sharded (pipelined)", lambda n: shardkit_sharded(n, nodes, f)),
                         ("sharded (3 phases)", lambda n: shardkit_sharded(n, nodes, f, False)),
                         ("full", lambda n: shardkit_full(n, nodes, f))):
            ax.plot([n / MIB for n in sizes], [fn(n) / b for n, b in zip(sizes, best)], label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(0.3, 4)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{nodes} nodes x {f.gpus} GPUs, 400 Gb/s IB")
        ax.set_xlabel("message (MiB)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("time / best of NCCL ring, tree (model)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", default=None, help="write the plot here (png)")
    args = p.parse_args()
    f = Fabric()
    print(table([64 * KIB, MIB, 16 * MIB, 256 * MIB, GIB], [2, 4, 16, 64], f))
    if args.plot:
        plot(args.plot, [2, 16], f)


if __name__ == "__main__":
    main()
