"""Schedules of the persistent kernels, as data: which CTA computes which output tile of which
product, over which K range, in which order its partials are reduced, and how the phases of a
step wait for each other.

One :class:`Schedule` drives three things that therefore cannot disagree: the Gluon kernels (they
read :meth:`Schedule.item_table` as an int32 tensor and take their launch shape from the fields),
the CPU executor (:mod:`.executor`, which CI runs against the reference backend) and the cost model
(``bench/kernels/costmodel.py`` reads the byte counts).

Legend
    B batch rows, H hidden units, e bytes per weight/activation element (2: bf16, fp16)
    C CTAs per cluster, Q = ctas / C clusters, P = ctas
    BM rows of an output tile (hidden units; for the gate product "z", BM/4 units of each gate)
    BK reduction block, KB = ceil(K / BK) blocks, BB batch columns of the MMA (B rounded up)

Every product is computed "swap-AB": out^T [rows, B] = W_view [rows, K] @ act^T [K, B], so the
hidden units fill the MMA's M (64-row instructions; 256 rows per CTA tile in the cluster design, 64
in the stationary one) and the batch its N (16 to 128): a batch of 1 wastes MMA columns but
nothing of the weight stream. The products of a step, in dependency order:

    forward   "hm"  rows H,  K H:   hm = h_{t-1} Wmh^T     epilogue m = xm * hm
              "z"   rows 4H, K H:   z = m Wh^T (+ xg)      epilogue gates, c_t, h_t
    backward  "dh"  rows H,  K H:   dh = dhm_{t+1} Wmh     epilogue cell derivatives -> dz_t, dc_{t-1}
              "dm"  rows H,  K 4H:  dm = dz_t Wh           epilogue dxm = dm * hm, dhm = dm * xm
    (after the last backward step one more "dh" turns dhm_0 into the gradient of h0)

Partition (both designs). The C CTAs of a cluster own C adjacent output tiles (a "group") and walk
the same K blocks at the same time, so each activation tile [B, BK] is loaded once per cluster and
multicast to its C CTAs (TMA multicast). A phase's work is the list of (group, K block) units,
group-major; cluster q takes the contiguous range [q U / Q, (q + 1) U / Q) of its U units (the
"stream-K" partition: no power-of-two tiles, every cluster within one unit of the others, so every
SM is busy whatever H and the SM count). A range that crosses a group boundary becomes two items.
An output tile whose K blocks fall to several clusters gets one partial per cluster ("parts"),
numbered in K order.

Reduction ("l2") and the finish. Each contribution stores its float32 partial to workspace block
``slot0 + part`` of its group (rank r's rows at r * BM). A phase runs in two passes per CTA: first
every contribution of its list (MMA, partial stores, and, for a split tile, +1 on the tile's
ticket), then the finish of each: every part finishes a slice of its tile (``finish_split``: the
tile's epilogue chunks of ``chunk_shape`` units x batch rows, part p of P taking chunks
[p n / P, (p + 1) n / P)), once the ticket shows all P parts stored. A chunk's sum is taken over
the parts in part order, ``gather_unroll`` parts loaded at a time (bitwise the same whoever stored
first; ``gate_gather_unroll`` parts of each of the four gates for "z"), with the epilogue's own
operands loaded before the parts (``epilogue_prefetch``). Tickets
only ever count up: a tile's ticket reaches P (k + 1) at its (k + 1)-th use in the launch
(:func:`ticket_target`), so nothing resets it and no wait can see a later use's count. The
arrivals of a pass all precede its waits, so no chain of waits runs through the clusters, and no
cycle. Why not DSMEM or TMA reduce-add: the parts of a tile sit in different clusters (the cluster
is laid along the output rows, for the multicast), out of each other's shared memory; and a TMA
reduce-add sums in arrival order, which would make results differ from run to run and break the
bit-exact chunked-call guarantee the other backends keep.

Synchronisation ("grid"). After its epilogues each CTA adds 1 to the counter of the phase instance
(n = 0, 1, ... over the whole call: 2 per step, plus the backward's tail); phase instance n + 1
starts (its activation loads, its epilogues) once counter n reaches P. The weight tiles of the
next phase do not depend on it: the producer issues them before it waits. Every wait is bounded in
time: a wait that runs out records which phase instance it was in, every later wait of the launch
returns at once, and the host raises naming the step. The grid flags need every CTA resident at
once: one CTA per SM (the kernels' shared memory allows no second), and clusters that fit the
GPCs: hence C = 2 by default (an H100 SXM's GPCs hold an even number of SMs, not always a multiple
of 4); where a GPU cannot hold them all, the waits run out and the launch fails cleanly.

Designs
    "cluster"     weights streamed from HBM/L2 every step (any H the TMA can address), 256-row tiles.
    "stationary"  64-row tiles (fewer parts per tile); each CTA loads the first ``res_blocks``
                  weight tiles of its walk (phase 0's, then phase 1's) into its shared memory once
                  per call and reuses them every step; where they do not all fit, the rest stream
                  through the ring every step with an L2 evict-last policy, so that they stay in L2
                  across steps (at most :data:`L2_KEEP_BYTES` of them: H up to 2048-2176 in 16-bit
                  on 132 SMs).
"""

from __future__ import annotations

import dataclasses
import math

from ..configs import Device

DESIGNS = ("cluster", "stationary")
DIRECTIONS = ("forward", "backward")
PRODUCTS = {"forward": ("hm", "z"), "backward": ("dh", "dm")}
REDUCTIONS = ("l2", "dsmem", "tma_add", "none")
SYNCS = ("grid", "cluster", "none")

# Rows of an output tile per CTA: two consumer warpgroups of 64-row MMAs, twice (the gate product:
# 64 units of each of the four gates, each gate one 64-row MMA).
BLOCK_M = 256
# The stationary design's tiles: one 64-row MMA (the two consumer warpgroups split the batch), so
# that a CTA's share of the weights comes in more, smaller tiles with fewer parts each.
STATIONARY_BLOCK_M = 64
# Weights a stationary schedule may leave in L2 across steps (marked evict-last): about half of an
# H100's 50 MB L2, the rest for the step's own traffic (partials, state, activations).
L2_KEEP_BYTES = 24 * 2**20
# 64 16-bit values: 128-byte rows, the TMA's widest swizzle.
BLOCK_K = 64
DEFAULT_CLUSTER = 2
# One batch tile, the MMA's N: the gate product keeps 4 accumulators of [64, N] per warpgroup pair,
# 128 float32 registers per thread at N = 128.
MAX_BATCH = 128
# Shared memory one block may use on sm_90 (227 KB), less what the stationary design keeps beside
# its resident weights: the activation ring and the barriers.
SMEM_PER_BLOCK = 232448
STAGES = 4
# The ring of a stationary schedule whose weights do not all fit: three stages of weight and
# activation tiles keep two loads in flight (at 64-row tiles, 48 KB: over an L2 round trip, more
# than one SM's assumed ingest rate) and leave the rest of shared memory to resident weights.
STREAM_STAGES = 3
# The finish (module docstring): an epilogue chunk holds at most EPILOGUE_ROWS units and
# EPILOGUE_VALUES values per CTA (8 per thread of the two consumer warpgroups); parts loaded per
# round of a chunk's gather, and for the gate product per gate (four gates at once: what fits the
# consumers' registers without a spill, bench/kernels/static.py).
EPILOGUE_ROWS = 64
EPILOGUE_VALUES = 2048
GATHER_UNROLL = 4
GATE_GATHER_UNROLL = 2
# Columns of item_table(): group, first K block, end K block, part, parts, first workspace block of
# the group.
ITEM_FIELDS = ("group", "kb_lo", "kb_hi", "part", "parts", "slot0")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One product of a step. ``rows`` is its M (H or 4H), ``K`` its reduction length; an output
    tile covers ``units_per_tile`` hidden units (of each of the four gates for "z"). ``sync`` is
    what every CTA waits for before the next phase starts."""

    index: int
    product: str
    operand: str
    rows: int
    K: int
    block_m: int
    block_k: int
    units_per_tile: int
    m_tiles: int
    k_blocks: int
    sync: str = "grid"


@dataclasses.dataclass(frozen=True)
class Tile:
    """One contribution: CTA ``cta`` (rank ``rank`` of cluster ``cluster_id``) computes output tile
    ``m_tile`` of phase ``phase`` over K blocks [kb_lo, kb_hi), as part ``part`` of ``parts`` (the
    fixed reduction order), into rows ``rank`` of workspace block ``slot``; ``seq`` is its place in
    the CTA's list."""

    cta: int
    cluster_id: int
    rank: int
    phase: int
    seq: int
    m_tile: int
    kb_lo: int
    kb_hi: int
    part: int
    parts: int
    slot: int
    resident: int = 0


@dataclasses.dataclass(frozen=True)
class Item:
    """What one cluster does at one place of its list: K blocks [kb_lo, kb_hi) of the group's C
    tiles (tile group * C + rank for each rank that exists), as part ``part`` of ``parts``, its
    partials into workspace block ``slot0 + part``; its first ``resident`` blocks' weights are in
    shared memory (stationary design), the rest stream through the ring."""

    cluster_id: int
    phase: int
    seq: int
    group: int
    kb_lo: int
    kb_hi: int
    part: int
    parts: int
    slot0: int
    resident: int = 0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A persistent kernel's launch and work for one (design, direction, B, H, dtype, device).

    Byte counts are per step (per direction) for the whole GPU; the I/O counts assume training:
    the forward saves what backward needs, the backward gets a gradient for the outputs only.
    ``res_blocks``: weight tiles each CTA keeps in shared memory (stationary), the first of its
    walk; ``l2_weight_bytes_per_step``: the stationary design's other weights, streamed from L2
    every step (counted in ``l2_bytes_per_step``, not in ``hbm_bytes_per_step``: they are marked to
    stay in L2; the first step reads them from HBM, counted in ``weight_bytes_per_call``).
    """

    design: str
    direction: str
    B: int
    H: int
    dtype_bytes: int
    ctas: int
    cluster: int
    active_sms: int
    split_k: int
    reduction: str
    resident_weight_bytes_per_cta: int
    block_m: int
    block_k: int
    block_b: int
    stages: int
    phases: tuple[Phase, ...]
    items: tuple[Item, ...]
    tiles: tuple[Tile, ...]
    slots: int
    hbm_bytes_per_step: int
    l2_bytes_per_step: int
    onchip_bytes_per_step: int
    multicast_bytes_saved_per_step: int
    weight_bytes_per_call: int
    res_blocks: int = 0
    l2_weight_bytes_per_step: int = 0
    epilogue_rows: int = EPILOGUE_ROWS
    epilogue_values: int = EPILOGUE_VALUES
    gather_unroll: int = GATHER_UNROLL
    gate_gather_unroll: int = GATE_GATHER_UNROLL
    epilogue_prefetch: bool = True
    finish_split: bool = True

    @property
    def clusters(self) -> int:
        return self.ctas // self.cluster

    def items_of(self, cluster_id: int, phase: int) -> list[Item]:
        return [it for it in self.items if it.cluster_id == cluster_id and it.phase == phase]

    def tiles_of(self, cta: int, phase: int) -> list[Tile]:
        return [t for t in self.tiles if t.cta == cta and t.phase == phase]

    def max_items(self) -> int:
        """The longest list any cluster has in any phase (the item table's middle dimension)."""
        return max([len(self.items_of(q, p.index)) for q in range(self.clusters) for p in self.phases] + [1])

    def item_table(self) -> tuple[list, list]:
        """(table, counts) for the kernels: table[phase][cluster][i] = the ITEM_FIELDS of the
        cluster's i-th item (zero rows past its count), counts[phase][cluster] = its item count."""
        width, table, counts = self.max_items(), [], []
        for p in self.phases:
            rows, row_counts = [], []
            for q in range(self.clusters):
                mine = [[getattr(it, f) for f in ITEM_FIELDS] for it in self.items_of(q, p.index)]
                row_counts.append(len(mine))
                rows.append(mine + [[0] * len(ITEM_FIELDS)] * (width - len(mine)))
            table.append(rows)
            counts.append(row_counts)
        return table, counts

    def resident_blocks(self) -> int:
        """Weight tiles [BM, BK] a CTA keeps resident (stationary design), else 0: the first
        ``res_blocks`` K blocks of its cluster's walk (a rank without a tile in a last, partial
        group loads zeros for it, so that all ranks walk the same blocks)."""
        return self.res_blocks if self.design == "stationary" else 0

    @property
    def streams(self) -> bool:
        """Whether some weight tiles stream through the ring every step."""
        return self.design == "cluster" or any(it.resident < it.kb_hi - it.kb_lo for it in self.items)

    def chunk_shape(self, phase: Phase) -> tuple[int, int]:
        """(units, batch rows) of one epilogue chunk of ``phase`` per CTA."""
        return chunk_shape(phase.units_per_tile, self.epilogue_rows, self.epilogue_values)

    def chunks(self, phase: Phase) -> int:
        """Epilogue chunks of one output tile of ``phase``, numbered units-major."""
        return chunk_count(phase.units_per_tile, self.B, self.epilogue_rows, self.epilogue_values)

    def chunk_rect(self, phase: Phase, m_tile: int, c: int) -> tuple[slice, slice]:
        """(units, batch rows) chunk ``c`` of tile ``m_tile`` covers (empty past H or B)."""
        rows, cols = self.chunk_shape(phase)
        n_b = math.ceil(self.B / cols)
        u0 = m_tile * phase.units_per_tile + (c // n_b) * rows
        u_end = min(self.H, (m_tile + 1) * phase.units_per_tile, u0 + rows)
        b0 = (c % n_b) * cols
        return slice(u0, max(u0, u_end)), slice(b0, min(self.B, b0 + cols))

    def finish_slice(self, phase: Phase, part: int, parts: int) -> tuple[int, int]:
        """Chunks [lo, hi) of its tile that part ``part`` of ``parts`` finishes."""
        if self.finish_split:
            return finish_slice(self.chunks(phase), part, parts)
        return (0, self.chunks(phase)) if part == parts - 1 else (0, 0)

    def unroll(self, phase: Phase) -> int:
        """Parts a round of ``phase``'s gather loads (of each gate, for "z")."""
        return self.gate_gather_unroll if phase.product == "z" else self.gather_unroll

    def barrier_target(self, instance: int) -> int:
        """The grid counter's value that releases phase instance ``instance + 1``."""
        return self.ctas * (instance + 1)


def chunk_shape(units_per_tile: int, rows: int = EPILOGUE_ROWS, values: int = EPILOGUE_VALUES) -> tuple[int, int]:
    """An epilogue chunk: min(rows, units of a tile) units x the batch rows that fill ``values``."""
    units = min(rows, units_per_tile)
    return units, max(1, values // units)


def chunk_count(units_per_tile: int, B: int, rows: int = EPILOGUE_ROWS, values: int = EPILOGUE_VALUES) -> int:
    units, cols = chunk_shape(units_per_tile, rows, values)
    return math.ceil(units_per_tile / units) * math.ceil(B / cols)


def finish_slice(chunks: int, part: int, parts: int) -> tuple[int, int]:
    """Chunks [lo, hi) of ``chunks`` that part ``part`` of ``parts`` finishes (the kernels compute
    the same two integer divisions)."""
    return part * chunks // parts, (part + 1) * chunks // parts


def ticket_target(instance: int, parts: int) -> int:
    """A split tile's ticket once all ``parts`` parts of phase instance ``instance`` are stored:
    each phase runs once per step (the backward's tail is phase 0's (T+1)-th use), and the count
    is never reset."""
    return parts * (instance // 2 + 1)


def phases_for(direction: str, H: int, block_m: int = BLOCK_M, block_k: int = BLOCK_K) -> tuple[Phase, ...]:
    """The products of one step in dependency order, with their tile counts."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; one of {DIRECTIONS}")
    shapes = {"hm": ("h", H, H), "z": ("m", 4 * H, H), "dh": ("dhm", H, H), "dm": ("dz", H, 4 * H)}
    phases = []
    for index, product in enumerate(PRODUCTS[direction]):
        operand, rows, K = shapes[product]
        units = block_m // 4 if product == "z" else block_m
        phases.append(Phase(index=index, product=product, operand=operand, rows=rows, K=K, block_m=block_m,
                            block_k=block_k, units_per_tile=units, m_tiles=math.ceil(H / units),
                            k_blocks=math.ceil(K / block_k)))
    return tuple(phases)


def _partition(phase: Phase, clusters: int, cluster: int) -> tuple[list[Item], int]:
    """The stream-K split of one phase over the clusters, and the workspace blocks it uses.

    Unit u = group * KB + kb; cluster q takes [q U / Q, (q + 1) U / Q), cut at group boundaries.
    A group's pieces are its parts in K order; part p of group g stores into block
    ``slot0(g) + p`` (one block holds the partials of the group's C tiles).

    Each cluster lists its pieces that are not a tile's last part first, then the ones that are
    (the order a single-finisher protocol needs to keep waits from chaining; with the two-pass
    finish every arrival precedes every wait anyway).
    """
    groups = math.ceil(phase.m_tiles / cluster)
    KB = phase.k_blocks
    U = groups * KB
    pieces = []  # (cluster, order in its range, group, kb_lo, kb_hi)
    for q in range(clusters):
        lo, hi = q * U // clusters, (q + 1) * U // clusters
        order = 0
        while lo < hi:
            g = lo // KB
            end = min(hi, (g + 1) * KB)
            pieces.append((q, order, g, lo - g * KB, end - g * KB))
            order += 1
            lo = end
    # Clusters take increasing units, so a group's pieces in cluster order are in K order.
    by_group: dict[int, list] = {}
    for piece in pieces:
        by_group.setdefault(piece[2], []).append(piece)
    slot0, blocks = {}, 0
    for g in sorted(by_group):
        slot0[g] = blocks
        blocks += len(by_group[g])
    items = []
    for g, group_pieces in by_group.items():
        group_pieces.sort(key=lambda p: p[3])
        for part, (q, order, _, kb_lo, kb_hi) in enumerate(group_pieces):
            items.append((q, part == len(group_pieces) - 1, order,
                          dict(group=g, kb_lo=kb_lo, kb_hi=kb_hi, part=part, parts=len(group_pieces), slot0=slot0[g])))
    items.sort(key=lambda x: (x[0], x[1], x[2]))
    result, seq_of = [], {}
    for q, _, _, fields in items:
        seq = seq_of.get(q, 0)
        seq_of[q] = seq + 1
        result.append(Item(cluster_id=q, phase=phase.index, seq=seq, **fields))
    return result, blocks


def _tiles(items: list[Item], phases: tuple[Phase, ...], cluster: int) -> list[Tile]:
    tiles = []
    for it in items:
        m_tiles = phases[it.phase].m_tiles
        for rank in range(cluster):
            m_tile = it.group * cluster + rank
            if m_tile >= m_tiles:
                continue  # the last group's missing tiles: that rank only receives the multicast
            tiles.append(Tile(cta=it.cluster_id * cluster + rank, cluster_id=it.cluster_id, rank=rank,
                              phase=it.phase, seq=it.seq, m_tile=m_tile, kb_lo=it.kb_lo, kb_hi=it.kb_hi,
                              part=it.part, parts=it.parts, slot=it.slot0 + it.part, resident=it.resident))
    return tiles


def _blocks_per_cluster(items, clusters: int) -> int:
    blocks = [0] * clusters
    for it in items:
        blocks[it.cluster_id] += it.kb_hi - it.kb_lo
    return max(blocks)


def _mark_resident(items: list[Item], res_blocks: int) -> list[Item]:
    """Each item's leading blocks among the first ``res_blocks`` of its cluster's walk (phase 0's
    items in list order, then phase 1's)."""
    left: dict[int, int] = {}
    out = []
    for it in sorted(items, key=lambda it: (it.cluster_id, it.phase, it.seq)):
        free = left.get(it.cluster_id, res_blocks)
        take = min(free, it.kb_hi - it.kb_lo)
        left[it.cluster_id] = free - take
        out.append(dataclasses.replace(it, resident=take))
    return sorted(out, key=lambda it: (it.phase, it.cluster_id, it.seq))


def _residency(items: list[Item], clusters: int, block_m: int, block_k: int, BB: int, e: int) -> tuple[int, int] | None:
    """(weight tiles a CTA of the stationary design keeps in shared memory, ring stages): all of
    its walk where they fit beside a STAGES-deep activation ring and one idle weight stage; else
    as many as fit beside a STREAM_STAGES-deep ring of both (the rest stream through it); None
    where not even one fits."""
    tile = block_m * block_k * e
    needed = _blocks_per_cluster(items, clusters)
    if needed * tile + STAGES * BB * block_k * e + tile + 4096 <= SMEM_PER_BLOCK:
        return needed, STAGES
    room = (SMEM_PER_BLOCK - STREAM_STAGES * (BB + block_m) * block_k * e - 4096) // tile
    return (room, STREAM_STAGES) if room >= 1 else None


def batch_block(B: int) -> int:
    """The MMA's N: B rounded up to a power of two, at least 16 (the compiled variants stay few)."""
    return max(16, 1 << (B - 1).bit_length())


def _valid_rows(phase: Phase, m_tile: int, H: int) -> int:
    """Rows of the tile inside the product (the rest are the TMA's zero fill, masked out)."""
    units = min(phase.units_per_tile, H - m_tile * phase.units_per_tile)
    return 4 * units if phase.product == "z" else units


def _k_len(phase: Phase, kb_lo: int, kb_hi: int) -> int:
    return min(kb_hi * phase.block_k, phase.K) - kb_lo * phase.block_k


def io_bytes(direction: str, B: int, H: int, e: int) -> tuple[int, int]:
    """(HBM, L2-only) bytes of one step's epilogues, training assumptions (see :class:`Schedule`).

    Forward: reads proj_t [B, 5H] and c_{t-1} (just written: L2); writes h_t, c_t (float32), the
    saved act_t [B, 6H], and m [B, H] (internal, read back by the next phase: L2).
    Backward: reads dout_t, act_t [B, 6H], c_t (HBM) and c_{t-1} (HBM now, L2 when the next step
    reads it as its c_t); reads and writes the carried dc (float32, L2); writes grad_proj_t
    [B, 5H] and dhm_t [B, H].
    """
    BH = B * H
    if direction == "forward":
        hbm = 5 * BH * e + 6 * BH * e + BH * e + 4 * BH
        l2 = 4 * BH + 2 * BH * e
    else:
        hbm = BH * e + 6 * BH * e + 2 * 4 * BH + 5 * BH * e + BH * e
        l2 = 2 * 4 * BH
    return hbm, l2


def _bytes(design: str, direction: str, B: int, H: int, e: int, BB: int, phases: tuple[Phase, ...],
           items: list[Item], tiles: list[Tile]) -> dict:
    """Bytes per step, counted from the tile plan (module docstring: where each byte comes from)."""
    weights = streamed = 0
    for t in tiles:
        phase = phases[t.phase]
        rows = _valid_rows(phase, t.m_tile, H)
        weights += rows * _k_len(phase, t.kb_lo, t.kb_hi) * e
        if t.kb_lo + t.resident < t.kb_hi:
            streamed += rows * _k_len(phase, t.kb_lo + t.resident, t.kb_hi) * e
    activations = saved = 0
    for it in items:
        phase = phases[it.phase]
        ranks = sum(1 for t in tiles if t.cluster_id == it.cluster_id and t.phase == it.phase and t.seq == it.seq)
        tile_bytes = B * _k_len(phase, it.kb_lo, it.kb_hi) * e
        activations += tile_bytes
        saved += (ranks - 1) * tile_bytes
    partials = sum(2 * _valid_rows(phases[t.phase], t.m_tile, H) * B * 4 for t in tiles)
    smem = sum((phases[t.phase].block_m + BB) * (t.kb_hi - t.kb_lo) * phases[t.phase].block_k * e for t in tiles)
    io_hbm, io_l2 = io_bytes(direction, B, H, e)
    return {"hbm_bytes_per_step": (streamed if design == "cluster" else 0) + io_hbm,
            "l2_bytes_per_step": streamed + activations + partials + io_hbm + io_l2,
            "onchip_bytes_per_step": smem,
            "multicast_bytes_saved_per_step": saved,
            "weight_bytes_per_call": weights if design == "stationary" else 0,
            "l2_weight_bytes_per_step": streamed if design == "stationary" else 0}


def _check_args(design: str, direction: str, B: int, H: int, dtype_bytes: int) -> None:
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; one of {DESIGNS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; one of {DIRECTIONS}")
    if B < 1 or H < 1 or dtype_bytes < 1:
        raise ValueError(f"B, H and dtype_bytes must be positive, got B={B}, H={H}, dtype_bytes={dtype_bytes}")


def applies(B: int, H: int, dtype_bytes: int, device: Device | None) -> str:
    """Why the persistent kernels cannot run a shape ("" when they can, design aside)."""
    if device is None or device.capability[0] != 9:
        return "the persistent kernels are compiled for sm_90a (Hopper) only"
    if dtype_bytes != 2:
        return "the persistent kernels take 16-bit weights only (wgmma in bf16/fp16, float32 accumulation)"
    if H % 8:
        return f"H = {H} is not a multiple of 8 (TMA needs 16-byte row strides)"
    if B > MAX_BATCH:
        return f"B = {B} rows exceeds one MMA batch tile ({MAX_BATCH})"
    if device.sms < 1:
        return "the device reports no multiprocessors"
    return ""


def block_k_for(direction: str, H: int, clusters: int, cluster: int, block_m: int = BLOCK_M) -> int:
    """BK: 64, or 32 or 16 where 64 would leave a cluster without work in some phase (small H)."""
    for bk in (BLOCK_K, BLOCK_K // 2, BLOCK_K // 4):
        phases = phases_for(direction, H, block_m, bk)
        if all(math.ceil(p.m_tiles / cluster) * p.k_blocks >= clusters for p in phases):
            return bk
    return BLOCK_K // 4


def plan(design: str, direction: str, B: int, H: int, dtype_bytes: int, device: Device | None, *,
         cluster: int = DEFAULT_CLUSTER, block_m: int | None = None, block_k: int | None = None,
         epilogue_rows: int = EPILOGUE_ROWS, epilogue_values: int = EPILOGUE_VALUES) -> Schedule | None:
    """The schedule of ``design`` for one direction at (B, H), or None where it does not apply
    (not Hopper, not 16-bit, H not a multiple of 8, B over 128, or, for "stationary", weights
    that fit neither the CTAs' shared memory nor, for the rest, :data:`L2_KEEP_BYTES` of L2).

    ``cluster``, ``block_m`` and ``block_k`` are the kernels' (2; 256 for "cluster", 64 for
    "stationary"; 64, 32 or 16 by :func:`block_k_for`), ``epilogue_rows`` and ``epilogue_values``
    their epilogue chunk; tests
    pass small tiles and chunks to exercise many splits and slices at small shapes.

    Example::

        >>> from fastmlstm.ops.triton.configs import Device
        >>> s = plan("cluster", "forward", 128, 4096, 2, Device(132, (9, 0), "H100"))
        >>> s.ctas, s.cluster, s.active_sms
        (132, 2, 132)
    """
    _check_args(design, direction, B, H, dtype_bytes)
    if applies(B, H, dtype_bytes, device):
        return None
    if cluster < 1 or cluster & (cluster - 1) or cluster > 8:
        raise ValueError(f"cluster must be 1, 2, 4 or 8 CTAs, got {cluster}")
    clusters = device.sms // cluster
    if clusters < 1:
        return None
    if block_m is None:
        block_m = STATIONARY_BLOCK_M if design == "stationary" else BLOCK_M
    if block_k is None:
        block_k = block_k_for(direction, H, clusters, cluster, block_m)
    if block_m % 4 or block_m < 4 or block_k < 1:
        raise ValueError(f"block_m must be a positive multiple of 4 and block_k positive, got {block_m}, {block_k}")
    ctas = clusters * cluster
    phases = phases_for(direction, H, block_m, block_k)
    items, slots = [], 0
    for phase in phases:
        phase_items, blocks = _partition(phase, clusters, cluster)
        items += phase_items
        slots = max(slots, blocks)
    BB = batch_block(B)
    e = dtype_bytes
    res_blocks, stages = 0, STAGES
    if design == "stationary":
        fit = _residency(items, clusters, block_m, block_k, BB, e)
        if fit is None:
            return None
        res_blocks, stages = fit
        items = _mark_resident(items, res_blocks)
    tiles = _tiles(items, phases, cluster)
    counts = _bytes(design, direction, B, H, e, BB, phases, items, tiles)
    if counts["l2_weight_bytes_per_step"] > L2_KEEP_BYTES:
        return None
    active = min(len({t.cta for t in tiles if t.phase == p.index}) for p in phases)
    return Schedule(design=design, direction=direction, B=B, H=H, dtype_bytes=e, ctas=ctas, cluster=cluster,
                    active_sms=active, split_k=max(it.parts for it in items), reduction="l2",
                    resident_weight_bytes_per_cta=res_blocks * block_m * block_k * e, block_m=block_m,
                    block_k=block_k, block_b=BB, stages=stages, phases=phases, items=tuple(items), tiles=tuple(tiles),
                    slots=slots, res_blocks=res_blocks, epilogue_rows=epilogue_rows, epilogue_values=epilogue_values,
                    **counts)
