"""Expert-parallel MoE dispatch and combine over peer memory (see ``workspace.py`` for the protocol).

One dispatch + combine round is four launches per rank:

    layout.py    local: each token's destination-rank mask (one copy per rank: dedup), its position
                 among its chunk's tokens to every rank, each (token, k)'s position among this rank's
                 pairs to its expert, per-chunk counts                              (no barrier)
    counts.py    the dynamic-gating size exchange: every rank's counts to every rank, one barrier,
                 then send offsets, expert-major bases, capacity and input checks  (one program)
    dispatch.py  each token pushed once into each destination's receive rows, with its metadata
    combine.py   each received token's local experts reduced (fp32, k order) and pushed back once;
                 the source sums the ranks' rows in rank order (+ residual)
"""
