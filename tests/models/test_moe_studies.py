"""The MoE studies' algorithms against brute force on small synthetic routings: placement (replica rule,
metrics, greedy, s-EG with and without replicas, anti-correlation), s-TS predictors and their quality
measures, static capacity against a per-slot loop, expert-buffer policies and the buffered runtime."""
import pytest
import torch

from shardkit.models.moe import buffering, gating, placement, speculative
from shardkit.models.moe.ep import VirtualExperts
from shardkit.models.moe.mixtral import Mixtral, combine_local, random_mixtral, route
from shardkit.models.moe.trace import RoutingTrace

from .moe_ep_checks import SMALL


def random_topk(n, e, k, seed, hot=None):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, e, generator=gen)
    if hot is not None:
        scores[:, hot] += 0.6
    return scores.topk(k, -1).indices


def clustered_topk(n, seed):
    """16 experts in two co-activated groups {0, 2, 4, ...} and {1, 3, 5, ...}: a token picks 4 from
    one group (rarely mixing), so an interleaved split needs ~2 ranks per token and the group split 1."""
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(0, 2, (n,), generator=gen)
    pick = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(n)]) * 2 + group[:, None]
    mix = torch.rand(n, generator=gen) < 0.05
    pick[mix, 0] = (pick[mix, 0] + 1) % 16
    return pick


# ---------------------------------------------------------------- placement

def brute_dest(p, idx, token_ids):
    out = []
    for t, row in enumerate(idx.tolist()):
        ranks = [p.replicas[e][0] if len(p.replicas[e]) == 1 else None for e in row]
        visited = {r for r in ranks if r is not None}
        for j, e in enumerate(row):
            if ranks[j] is None:
                cands = [r for r in p.replicas[e] if r in visited] or list(p.replicas[e])
                ranks[j] = cands[int(token_ids[t]) % len(cands)]
                visited.add(ranks[j])
        out.append(ranks)
    return torch.tensor(out)


def test_dest_ranks_replica_rule_matches_brute_force():
    p = placement.Placement(3, ((0,), (1, 2), (2,), (0, 1, 2), (1,), (0, 2), (2,), (1,)))
    idx = random_topk(300, 8, 3, 0)
    ids = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(p.dest_ranks(idx, ids), brute_dest(p, idx, ids))
    m = placement.evaluate(p, idx, src_rank=ids % 3, token_ids=ids)
    ranks = brute_dest(p, idx, ids).tolist()
    assert m.copies_per_token == pytest.approx(sum(len(set(r)) for r in ranks) / 300)
    assert m.remote_copies_per_token == pytest.approx(sum(len(set(r) - {int(i) % 3}) for r, i in zip(ranks, ids)) / 300)
    loads = [sum(r.count(k) for r in ranks) for k in range(3)]
    assert m.loads == loads and m.max_load_ratio == pytest.approx(max(loads) / (sum(loads) / 3))


def test_placement_rejects_bad_tables():
    with pytest.raises(ValueError, match="expert 1"):
        placement.Placement(2, ((0,), ()))
    with pytest.raises(ValueError, match="expert 0"):
        placement.Placement(2, ((0, 2),))
    with pytest.raises(ValueError, match="replicates"):
        placement.Placement(2, ((0, 1),)).expert_rank()


def test_greedy_balances_equal_counts():
    idx = random_topk(2000, 16, 4, 2, hot=[0, 1, 2])
    p = placement.greedy(idx, 16, 4)
    assert p.slots() == [4, 4, 4, 4]
    assert placement.evaluate(p, idx).max_load_ratio <= placement.evaluate(placement.contiguous(16, 4), idx).max_load_ratio


def test_s_eg_finds_the_co_activated_groups():
    fit, held = clustered_topk(3000, 3), clustered_topk(3000, 4)
    contiguous = placement.evaluate(placement.contiguous(16, 2), held)
    p = placement.s_eg(fit, 16, 2, cap=1.1)
    m = placement.evaluate(p, held)
    assert contiguous.copies_per_token > 1.8
    assert m.copies_per_token < 1.1 and m.max_load_ratio < 1.1
    assert sorted(p.rank_experts()) == [list(range(0, 16, 2)), list(range(1, 16, 2))]


def test_replicating_a_hot_expert_meets_a_load_cap_a_split_cannot():
    """Expert 0 in every token's top-2 of 9: half of all slots, so at EP=2 the rank holding it carries
    it plus >= 3 of the 8 others (at most 5 experts a rank): >= 1.375x the mean. With a copy on each
    rank every token's 0-slot goes to the rank of its other expert, and 4 + 4 others balance."""
    idx = torch.cat([torch.zeros(2000, 1, dtype=torch.long), torch.randint(1, 9, (2000, 1),
                                                                           generator=torch.Generator().manual_seed(5))], 1)
    no_copies = placement.s_eg(idx, 9, 2, cap=1.15)
    with_copies = placement.s_eg(idx, 9, 2, cap=1.15, extra_slots=1)
    assert placement.evaluate(no_copies, idx).max_load_ratio > 1.3
    m = placement.evaluate(with_copies, idx)
    assert m.max_load_ratio <= 1.15 and m.copies_per_token == 1.0
    assert with_copies.replicas[0] == (0, 1) and max(with_copies.slots()) <= 6


def test_anti_correlation_pairs_negatively_correlated_experts():
    fit = clustered_topk(2000, 6)
    p = placement.anti_correlation(fit, 16, 2, cap=1.2)
    # experts of one co-activated group are positively correlated: anti-correlation mixes the groups
    for experts in p.rank_experts():
        assert 2 <= sum(e % 2 for e in experts) <= 6


def test_virtual_experts_map_copies_rank_major():
    p = placement.Placement(2, ((1,), (0, 1), (0,), (1,)))
    v = VirtualExperts(p)
    assert v.rank_of == (0, 0, 1, 1, 1) and v.expert_of == (1, 2, 0, 1, 3)
    assert v.local(0) == [1, 2] and v.local(1) == [0, 1, 3]
    idx = torch.tensor([[1, 2], [1, 0], [3, 1]])
    vids = v.ids(idx)
    ranks = p.dest_ranks(idx)
    assert all(v.rank_of[int(x)] == int(r) and v.expert_of[int(x)] == int(e)
               for x, r, e in zip(vids.flatten(), ranks.flatten(), idx.flatten()))


# ---------------------------------------------------------------- s-TS

def synthetic_trace(n, seed, layers=2, e=8, k=2):
    gen = torch.Generator().manual_seed(seed)
    idx0 = random_topk(n, e, k, seed)
    idx1 = (idx0 + 3) % e  # layer 1 is a function of layer 0's choice
    probs = torch.softmax(torch.randn(layers, n, e, generator=gen), -1)
    pregate = torch.zeros(layers, n, e)
    pregate[0].scatter_(1, idx1, 1.0)
    return RoutingTrace(topk_idx=torch.stack([idx0, idx1]), topk_weights=torch.full((layers, n, k), 1 / k),
                        probs=probs, pregate=pregate, seq=torch.arange(n) // 8, nll=torch.zeros(n))


def test_rank_sets_and_quality_measures():
    p = placement.contiguous(8, 4)  # experts 2r, 2r+1 on rank r
    sets = speculative.rank_sets(p, torch.tensor([[0, 1], [0, 7], [2, 5]]))
    assert sets.tolist() == [0b0001, 0b1001, 0b0110]
    q = speculative.prediction_quality(torch.tensor([0b0001, 0b0001, 0b0111]), sets, torch.tensor([0, 3, 2]))
    assert q["accuracy"] == pytest.approx(1 / 3)
    assert q["coverage"] == pytest.approx(4 / 5)  # needed copies 1 + 2 + 2, sent early 1 + 1 + 2
    assert q["waste_per_token"] == pytest.approx(1 / 3)
    assert q["late_copies_per_token"] == pytest.approx(1 / 3)
    assert q["remote_copies_per_token"] == pytest.approx((0 + 1 + 1) / 3)
    assert q["late_remote_copies_per_token"] == pytest.approx(0.0)  # the missed copy of token 1 is local (rank 3)


@pytest.mark.parametrize("world", [2, 4])
def test_predictors_learn_a_deterministic_layer_to_layer_map(world):
    fit, held = synthetic_trace(600, 7), synthetic_trace(300, 8)
    p = placement.contiguous(8, world)
    target_fit = speculative.rank_sets(p, fit.topk_idx[1])
    actual = speculative.rank_sets(p, held.topk_idx[1])
    for pred in (speculative.TopkTable(min_count=1), speculative.PregatePredictor(p, 2),
                 speculative.ProbePredictor(p, steps=20)):
        got = pred.fit(fit, 0, target_fit).predict(held, 0)
        assert speculative.prediction_quality(got, actual)["accuracy"] > 0.97, pred.name
    top1 = speculative.Top1Table().fit(fit, 0, target_fit).predict(held, 0)
    assert speculative.prediction_quality(top1, actual)["accuracy"] < 0.97  # the top-1 key alone cannot know


# ---------------------------------------------------------------- gating

def test_capacity_positions_and_drops_match_a_slot_loop():
    idx = random_topk(37, 6, 2, 9, hot=[1])
    pos = gating.capacity_positions(idx, 6)
    seen = [0] * 6
    for k in range(2):
        for t in range(37):
            e = int(idx[t, k])
            assert int(pos[t, k]) == seen[e]
            seen[e] += 1
    c = gating.capacity(37, 2, 6, 1.0)
    assert gating.dropped_fraction(idx, 6, 1.0) == pytest.approx(sum(max(0, s - c) for s in seen) / 74)


@pytest.mark.parametrize("factor", [0.5, 1.0, 100.0])
def test_capacity_moe_equals_local_moe_without_the_dropped_slots(factor):
    layer = random_mixtral(SMALL, 3, torch.float64).layers[0]
    x = torch.randn(29, SMALL.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = route(x, layer.router, SMALL.topk)
    dropped = []
    got = gating.capacity_moe(x, r, layer, factor, dropped)
    keep = gating.capacity_positions(r.topk_idx, SMALL.num_experts) < gating.capacity(29, 4, 16, factor)
    want = combine_local(x, torch.where(keep, r.topk_idx, -1), r.topk_weights, layer.gate_up, layer.down)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert dropped == [(int((~keep).sum()), keep.numel())]
    assert (factor < 100) == (dropped[0][0] > 0)


# ---------------------------------------------------------------- buffering

def test_cache_policies_on_a_hand_sequence():
    uses = [1, 2, 3, 1, 4, 5, 1]
    hits = {}
    for policy in ("lifo", "lru", "fifo"):
        state = buffering.CacheState(3, policy)
        hits[policy] = [state.access(e)[1] for e in uses]
    # 3 slots filled by 1, 2, 3; at 4: lifo evicts 3 (last loaded), lru evicts 2, fifo evicts 1
    assert hits["lifo"] == [False, False, False, True, False, False, True]  # 5 evicts 4
    assert hits["lru"] == [False, False, False, True, False, False, True]  # 5 evicts 3
    assert hits["fifo"] == [False, False, False, True, False, False, False]  # 1 evicted by 4
    with pytest.raises(ValueError, match="policy"):
        buffering.CacheState(2, "random")


def test_belady_is_an_upper_bound():
    gen = torch.Generator().manual_seed(10)
    steps = [sorted(set(torch.randint(0, 12, (4,), generator=gen).tolist())) for _ in range(300)]
    rates = {p: buffering.simulate(steps, 5, p).hit_rate for p in buffering.POLICIES}
    assert all(rates["belady"] >= r - 1e-12 for r in rates.values()), rates
    perfect = buffering.simulate(steps, 5, "lru", predicted=steps)
    assert perfect.hit_rate == 1.0 and perfect.prefetch_hits > 0


def test_buffered_model_equals_local_and_counts_like_the_simulator():
    weights = random_mixtral(SMALL, 6, torch.float32)
    buf = buffering.ExpertBuffer(weights.layers, slots=5, policy="lifo")
    local = Mixtral(SMALL, weights)
    buffered = Mixtral(SMALL, weights, buffering.BufferedMoE(buf, SMALL.topk))
    buffered.trace = []
    tokens = torch.randint(0, SMALL.vocab_size, (2, 6), generator=torch.Generator().manual_seed(11))
    cache_a, cache_b = local.new_cache(2, 9), buffered.new_cache(2, 9)
    outs = [(local.forward(tokens[:, :4], cache_a, 0), buffered.forward(tokens[:, :4], cache_b, 0))]
    for pos in (4, 5):
        outs.append((local.forward(tokens[:, pos:pos + 1], cache_a, pos),
                     buffered.forward(tokens[:, pos:pos + 1], cache_b, pos)))
    for a, b in outs:
        assert torch.equal(a, b)
    for layer in range(SMALL.num_layers):
        steps = [sorted(set(r.topk_idx.flatten().tolist())) for i, _, r, _ in buffered.trace if i == layer]
        sim = buffering.simulate(steps, 5, "lifo")
        assert (buf.stats[layer].requests, buf.stats[layer].hits) == (sim.requests, sim.hits)
