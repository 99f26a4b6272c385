"""The persistent kernels' schedules (fastmlstm/ops/triton/persistent/schedule.py) as data: the
invariants the kernels rely on, at the model's shapes on an H100/H200-sized device and at small
odd ones, and one schedule checked by hand. The kernels cannot run here; their schedule can."""

import math

import pytest

from fastmlstm.ops.triton.configs import Device
from fastmlstm.ops.triton.persistent import schedule
from fastmlstm.ops.triton.persistent.schedule import plan

HOPPER = Device(132, (9, 0), "NVIDIA H100 80GB HBM3")
MODEL = [(4096, 128), (2048, 128), (1024, 64), (4096, 1)]
CASES = [(design, direction, H, B) for design in schedule.DESIGNS for direction in schedule.DIRECTIONS
         for H, B in MODEL]


def _schedules():
    found = [(case, plan(case[0], case[1], case[3], case[2], 2, HOPPER)) for case in CASES]
    small = [plan(d, r, B, H, 2, Device(sms, (9, 0)), block_m=bm, block_k=bk)
             for d in schedule.DESIGNS for r in schedule.DIRECTIONS
             for (H, B, sms, bm, bk) in [(40, 5, 6, 16, 8), (72, 37, 7, 32, 8), (24, 1, 4, 8, 16)]]
    return [s for _, s in found if s is not None] + [s for s in small if s is not None]


SCHEDULES = _schedules()


def test_model_shapes_have_the_designs_the_issue_names():
    got = {case: plan(case[0], case[1], case[3], case[2], 2, HOPPER) is not None for case in CASES}
    for direction in schedule.DIRECTIONS:
        for H, B in MODEL:
            assert got[("cluster", direction, H, B)], (direction, H, B)
        # Weights kept across steps where they fit 132 SMs' shared memory (H = 1024) or, for the rest,
        # the L2 a kernel may keep (H = 2048); not at H = 4096.
        assert got[("stationary", direction, 1024, 64)] and got[("stationary", direction, 2048, 128)]
        assert not got[("stationary", direction, 4096, 128)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: f"{s.design}-{s.direction}-H{s.H}-B{s.B}-P{s.ctas}")
def test_every_tile_covers_k_exactly_once_in_part_order(sched):
    for phase in sched.phases:
        for m_tile in range(phase.m_tiles):
            parts = sorted((t for t in sched.tiles if t.phase == phase.index and t.m_tile == m_tile),
                           key=lambda t: t.part)
            assert parts, f"{phase.product} tile {m_tile} has no contribution"
            assert [t.part for t in parts] == list(range(parts[0].parts)) and all(t.parts == len(parts) for t in parts)
            # The parts tile [0, KB) in K order, without gap or overlap: the fixed reduction order is K order.
            assert parts[0].kb_lo == 0 and parts[-1].kb_hi == phase.k_blocks
            assert all(a.kb_hi == b.kb_lo and a.kb_lo < a.kb_hi for a, b in zip(parts, parts[1:]))
            # Rank r of a cluster owns tile group * C + r.
            assert all(t.cta % sched.cluster == m_tile % sched.cluster for t in parts)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: f"{s.design}-{s.direction}-H{s.H}-B{s.B}-P{s.ctas}")
def test_workspace_blocks_and_item_order(sched):
    for phase in sched.phases:
        items = [it for it in sched.items if it.phase == phase.index]
        blocks = [it.slot0 + it.part for it in items]
        assert len(set(blocks)) == len(blocks) and max(blocks) < sched.slots
        for q in range(sched.clusters):
            mine = sched.items_of(q, phase.index)
            assert [it.seq for it in mine] == list(range(len(mine)))
            # A cluster finishes tiles only after all its other contributions: waits never chain.
            finishing = [it.part == it.parts - 1 for it in mine]
            assert finishing == sorted(finishing)
    assert sched.split_k == max(it.parts for it in sched.items)
    assert sched.ctas == sched.clusters * sched.cluster and sched.reduction == "l2"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_sm_busy_and_bytes_from_the_tile_plan(case):
    design, direction, H, B = case
    sched = plan(design, direction, B, H, 2, HOPPER)
    if sched is None:
        pytest.skip("the design does not apply here")
    if B >= 64:
        assert sched.ctas == HOPPER.sms and sched.active_sms == HOPPER.sms
    weights = 5 * H * H * 2
    io_hbm, _ = schedule.io_bytes(direction, B, H, 2)
    if design == "cluster":
        assert sched.hbm_bytes_per_step == weights + io_hbm and sched.resident_weight_bytes_per_cta == 0
    else:
        assert sched.hbm_bytes_per_step == io_hbm and sched.weight_bytes_per_call == weights
        assert 0 < sched.resident_weight_bytes_per_cta < schedule.SMEM_PER_BLOCK
    # Multicast: each activation byte a cluster reads reaches C CTAs (fewer on a last, partial group).
    assert 0 < sched.multicast_bytes_saved_per_step <= (sched.cluster - 1) * sched.l2_bytes_per_step
    assert sched.l2_bytes_per_step > sched.hbm_bytes_per_step - io_hbm


@pytest.mark.parametrize("sched", [s for s in SCHEDULES if s.design == "stationary"],
                         ids=lambda s: f"{s.direction}-H{s.H}-B{s.B}-P{s.ctas}")
def test_resident_weights_are_the_first_of_each_walk(sched):
    """A stationary CTA keeps the first res_blocks weight tiles of its cluster's walk (phase 0's
    items in order, then phase 1's) in shared memory, which they fit beside the ring; the rest
    stream, and only where they fit the L2 the schedule may keep."""
    tile = sched.block_m * sched.block_k * sched.dtype_bytes
    ring = sched.stages * sched.block_b * sched.block_k * sched.dtype_bytes + tile * (
        sched.stages if sched.streams else 1)
    assert sched.res_blocks * tile + ring + 4096 <= schedule.SMEM_PER_BLOCK
    streamed = 0
    for q in range(sched.clusters):
        walk = [it for p in sched.phases for it in sched.items_of(q, p.index)]
        left = sched.res_blocks
        for it in walk:
            assert it.resident == min(left, it.kb_hi - it.kb_lo)
            left -= it.resident
            streamed += it.kb_hi - it.kb_lo - it.resident
    assert sched.streams == (streamed > 0)
    assert all(t.resident == next(it.resident for it in sched.items if (it.cluster_id, it.phase, it.seq) ==
                                  (t.cluster_id, t.phase, t.seq)) for t in sched.tiles)
    assert 0 <= sched.l2_weight_bytes_per_step <= schedule.L2_KEEP_BYTES
    assert (sched.l2_weight_bytes_per_step > 0) == sched.streams


def test_h2048_keeps_part_of_its_weights_in_shared_memory_and_the_rest_in_l2():
    """H = 2048, B = 128: 320 KB of weights per CTA; 18 tiles of 64 x 64 (147 KB) in shared memory
    beside a 3-stage ring (72 KB), the other 22.5 MB of the step's weights streamed from L2."""
    for direction in schedule.DIRECTIONS:
        s = plan("stationary", direction, 128, 2048, 2, HOPPER)
        assert (s.block_m, s.block_k, s.stages, s.res_blocks) == (64, 64, 3, 18) and s.streams
        assert s.resident_weight_bytes_per_cta == 18 * 64 * 64 * 2
        weights = 5 * 2048 * 2048 * 2
        assert s.weight_bytes_per_call == weights and s.l2_weight_bytes_per_step == pytest.approx(22.48e6, rel=1e-3)
        assert s.hbm_bytes_per_step == schedule.io_bytes(direction, 128, 2048, 2)[0]


def test_a_small_schedule_by_hand():
    """H = 24, 4 SMs, clusters of 2, 8-row tiles, 16-wide K blocks: forward hm has 3 tiles of 8
    units (2 groups, the second with one tile) and K = 24 in 2 blocks: 4 units for 2 clusters."""
    s = plan("cluster", "forward", 3, 24, 2, Device(4, (9, 0)), block_m=8, block_k=16)
    hm, z = s.phases
    assert (hm.m_tiles, hm.k_blocks, z.m_tiles, z.units_per_tile) == (3, 2, 12, 2)
    assert (s.ctas, s.clusters, s.block_b) == (4, 2, 16)
    hm_items = [(it.cluster_id, it.group, it.kb_lo, it.kb_hi, it.part, it.parts) for it in s.items if it.phase == 0]
    # Units 0..3 = (group 0, kb 0), (0, 1), (1, 0), (1, 1); cluster 0 takes group 0, cluster 1 group 1.
    assert hm_items == [(0, 0, 0, 2, 0, 1), (1, 1, 0, 2, 0, 1)]
    # Group 1 has one tile (tile 2): rank 1 of cluster 1 only receives the multicast.
    assert sorted((t.cta, t.m_tile) for t in s.tiles if t.phase == 0) == [(0, 0), (1, 1), (2, 2)]
    assert s.active_sms == 3 and s.multicast_bytes_saved_per_step > 0
    # z: 12 tiles -> 6 groups x 2 K blocks = 12 units, 6 per cluster, no split.
    assert all(it.parts == 1 for it in s.items if it.phase == 1) and s.split_k == 1


def test_small_shapes_split_k_across_clusters():
    s = plan("cluster", "backward", 5, 40, 2, Device(6, (9, 0)), block_m=16, block_k=8)
    dm = s.phases[1]
    assert (dm.K, dm.k_blocks) == (160, 20) and s.split_k >= 2
    assert math.ceil(dm.m_tiles / 2) * dm.k_blocks == sum(it.kb_hi - it.kb_lo for it in s.items if it.phase == 1)


@pytest.mark.parametrize("args, why", [
    ((128, 4096, 2, Device(132, (8, 0))), "sm_90a"),
    ((128, 4096, 4, HOPPER), "16-bit"),
    ((128, 4100, 2, HOPPER), "multiple of 8"),
    ((129, 4096, 2, HOPPER), "batch tile"),
    ((128, 4096, 2, None), "sm_90a"),
])
def test_where_the_kernels_do_not_apply(args, why):
    B, H, e, device = args
    for design in schedule.DESIGNS:
        assert plan(design, "forward", B, H, e, device) is None
    assert why in schedule.applies(B, H, e, device)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="design"):
        plan("bogus", "forward", 1, 8, 2, HOPPER)
    with pytest.raises(ValueError, match="direction"):
        plan("cluster", "sideways", 1, 8, 2, HOPPER)
    with pytest.raises(ValueError, match="cluster"):
        plan("cluster", "forward", 1, 8, 2, HOPPER, cluster=3)


def test_item_table_matches_the_items():
    s = plan("stationary", "forward", 64, 1024, 2, HOPPER)
    table, counts = s.item_table()
    assert len(table) == 2 and len(table[0]) == s.clusters and len(table[0][0]) == s.max_items()
    for p in range(2):
        for q in range(s.clusters):
            mine = s.items_of(q, p)
            assert counts[p][q] == len(mine)
            assert table[p][q][:len(mine)] == [[getattr(it, f) for f in schedule.ITEM_FIELDS] for it in mine]
    assert s.resident_blocks() * s.block_m * s.block_k * 2 == s.resident_weight_bytes_per_cta
