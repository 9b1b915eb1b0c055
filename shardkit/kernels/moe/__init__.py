"""Expert-parallel MoE dispatch and combine over peer memory (see ``workspace.py`` for the protocol).

One dispatch + combine round is three launches per rank:

    counts.py    layout (layout.py, one chunk of tokens per program): each token's destination-rank
                 mask (one copy per rank: dedup), its position among its chunk's tokens to every rank,
                 each (token, k)'s position among the chunk's pairs to its expert; then, by the last
                 program, the dynamic-gating size exchange: every rank's counts to every rank, one
                 barrier, send offsets, expert-major bases, capacity and input checks
    dispatch.py  each token pushed once into each destination's receive rows, with its metadata
                 (one barrier at the end)
    combine.py   each received token's local experts reduced (fp32, k order) and pushed back once;
                 the source sums the ranks' rows in rank order (+ residual) item by item as they land
                 (no barrier: per-item flags)
launch_config.py holds the grids (MoeLaunchConfig).
"""
