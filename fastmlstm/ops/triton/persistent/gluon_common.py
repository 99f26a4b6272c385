"""Pieces both persistent Gluon kernels share (sm_90a): layouts, the grid flags, the TMA producer
and the warpgroup-MMA main loops (the finish of split tiles: :mod:`.gluon_finish`).

Legend (as in :mod:`.schedule`)
    C  CTAs per cluster (one Gluon program is a cluster: tensors whose layout splits dimension 0
       over the CTAs hold each CTA's own rows, so "rank" is the index of that split)
    ROWS output rows per CTA tile: 256 ("cluster": two warpgroups of 64-row MMAs along the rows,
       twice; the gate product 64 units x 4 gates, one 64-row MMA per gate) or 64 ("stationary":
       one 64-row MMA, the two warpgroups splitting the batch; the gate product 16 units x 4 gates
       in one MMA, its rows gate-major); GU = ROWS / 4 units of each gate
    BK reduction block, BB batch columns (the MMA's N), S ring stages
    RES_BLOCKS weight tiles kept in shared memory (the first of the CTA's walk: phase 0's blocks
       in item order, then phase 1's), STREAM whether other tiles come through the ring
    EM x EB the epilogue's chunk (units x batch rows), 8 values per thread at 8 warps
    p_ pointers, b_ register tiles, o_ offsets, k_ masks, n_ counts

Partitions (gl.warp_specialize): the default partition (8 warps, two consumer warpgroups) issues
the warpgroup MMAs and runs the epilogues; one producer warp issues every TMA load. Weight tiles
live in one buffer: slots [0, RES_BLOCKS) hold the resident tiles, slots RES_BLOCKS + s the ring
(S stages where STREAM). Per ring stage s: ``ready[s]`` (the stage's bytes landed; one per CTA),
``w_empty[s]`` (this CTA's consumers are done with the stage: arrived for every use, so that its
phases count the uses), ``a_empty[s]`` (one barrier for the cluster, in the lead CTA: every CTA's
consumers are done with the activation tile, so the lead may multicast the next one into all of
them). A stationary schedule's streamed tiles are loaded with an L2 evict-last policy: they stay
in L2 for the next step.

Grid flags: ``sync[n]`` counts the CTAs that finished phase instance n (every CTA adds 1 after
its epilogues; a per-instance counter, so polling for equality cannot miss an overshoot), and
``tickets[phase, tile]`` counts the contributions stored for a split tile over the whole launch
(every part adds 1, then waits for parts x uses: ``schedule.ticket_target``; never reset). A
phase runs in two passes (``schedule``'s module docstring): the contributions, then each one's
slice of its tile's epilogue chunks. Every wait is ``gl.atomic_poll`` with a time limit; a wait
that runs out records its code in ``err`` (max over CTAs) and every later wait of the launch
returns at once, so a broken launch ends quickly and the host raises (:mod:`.launch`).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    CachePolicy, FractionalEvictionPolicy, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

# Module constants are gl.constexpr so that the kernels can read them.
EPI_M = gl.constexpr(64)
EPI_B = gl.constexpr(32)
# Parts a chunk's gather loads per round, all in flight at once (schedule.GATHER_UNROLL); the
# gate product loads that many parts of each of its four gates (schedule.GATE_GATHER_UNROLL).
GATHER = gl.constexpr(4)
GATE_GATHER = gl.constexpr(2)
CONSUMER_WARPS = gl.constexpr(8)
# Producer partition: one warp, few registers (setmaxnreg gives the rest to the consumers).
PRODUCER_REGS = gl.constexpr(40)
# W_MODE: how a phase's weight tile is laid out in shared memory (and read by the MMA).
W_KMAJOR = gl.constexpr(0)   # [C*ROWS, BK], K contiguous (torch's [out, in] weights, forward hm)
W_GATES = gl.constexpr(1)    # 4 x [C*GU, BK]: GU units of each gate, K contiguous (forward z)
W_MNMAJOR = gl.constexpr(2)  # [BK, C*ROWS], the rows contiguous (backward: W read transposed)
# Weight tiles a stationary schedule streams: kept in L2 for the next step.
KEEP_IN_L2 = gl.constexpr(CachePolicy(l2=FractionalEvictionPolicy("evict_last", 1.0)))


@gluon.constexpr_function
def split_dim(C, rank, dim):
    """CGA bases that give each of the C CTAs a contiguous chunk of dimension ``dim``."""
    C, rank, dim = int(C), int(rank), int(dim)
    return [[(1 << i) if d == dim else 0 for d in range(rank)] for i in range(C.bit_length() - 1)]


@gluon.constexpr_function
def broadcast(C, rank):
    """CGA bases under which every CTA holds the whole tensor (a multicast destination)."""
    return [[0] * int(rank) for _ in range(int(C).bit_length() - 1)]


@gluon.constexpr_function
def acc_layout(C, BB, ROWS, gates):
    """An accumulator [C*ROWS, BB] (or, for the 256-row gate product, [C*64, BB] per gate): with
    256 rows the two warpgroups split the rows; with 64 they split the batch columns."""
    if gates or int(ROWS) == 64:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, int(BB) // 2, 16],
                                         cga_layout=split_dim(C, 2, 0))
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, int(BB), 16],
                                     cga_layout=split_dim(C, 2, 0))


@gluon.constexpr_function
def epi_layout(C, EM):
    """[C*EM, EB] epilogue chunks (EB = 2048 / EM), units fastest (the state tensors are [B, H],
    units contiguous): 64 units x 32 rows, or 16 units x 128 rows (a 64-row gate tile's units)."""
    if int(EM) == 16:
        return gl.BlockedLayout([1, 1], [16, 2], [1, int(CONSUMER_WARPS)], [0, 1], cga_layout=split_dim(C, 2, 0))
    return gl.BlockedLayout([2, 1], [32, 1], [1, int(CONSUMER_WARPS)], [0, 1], cga_layout=split_dim(C, 2, 0))


@gluon.constexpr_function
def epi_cols(EM):
    return 2048 // int(EM)


@gluon.constexpr_function
def rank_layout(C, warps):
    """One element per CTA: the per-CTA flag operations (one thread of each CTA performs them)."""
    return gl.BlockedLayout([1], [32], [int(warps)], [0], cga_layout=split_dim(C, 1, 0))


@gluon.constexpr_function
def w_slots(RES_BLOCKS, S, STREAM):
    """Slots of the weight buffer: the resident tiles, then the ring where tiles stream."""
    return int(RES_BLOCKS) + (int(S) if STREAM else 0)


@gluon.constexpr_function
def at_least_one(n):
    return max(1, int(n))


# --------------------------------------------------------------------------------- the pipeline

@gluon.jit
def pipeline_buffers(w_desc, a_desc, C: gl.constexpr, S: gl.constexpr, RES_BLOCKS: gl.constexpr,
                     STREAM: gl.constexpr):
    """The shared memory of a persistent kernel's TMA pipeline, barriers initialized: the weight
    buffer (resident tiles, then the streaming ring), the activation ring (one tile multicast to
    the cluster), and the barriers ``ready``, ``w_empty``, ``a_empty`` (per ring stage) and
    ``res_ready`` (per resident tile). Returns ``(wbuf, a_ring, ready, w_empty, a_empty, res_ready)``."""
    wbuf = gl.allocate_shared_memory(w_desc.dtype, [w_slots(RES_BLOCKS, S, STREAM)] + w_desc.block_shape,
                                     w_desc.layout)
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [S] + a_desc.block_shape, a_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [S, C], mbarrier.MBarrierLayout.multicta(C))
    w_empty = gl.allocate_shared_memory(gl.int64, [S, C], mbarrier.MBarrierLayout.multicta(C))
    a_empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout(cga_layout=broadcast(C, 1)))
    res_ready = gl.allocate_shared_memory(gl.int64, [at_least_one(RES_BLOCKS), C], mbarrier.MBarrierLayout.multicta(C))
    for s in gl.static_range(S):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(w_empty.index(s), count=1)
        mbarrier.init(a_empty.index(s), count=1)
    for r in gl.static_range(RES_BLOCKS):
        mbarrier.init(res_ready.index(r), count=1)
    return wbuf, a_ring, ready, w_empty, a_empty, res_ready


# ------------------------------------------------------------------------------------ grid flags

@gluon.jit
def ranks(C: gl.constexpr):
    return gl.arange(0, C, rank_layout(C, gl.num_warps()))


@gluon.jit
def arrive_each(p_flags):
    """Each CTA adds 1 to its flag (``p_flags``: [C] pointers, one per CTA), with release: the
    CTA's earlier stores, ordered before by the barrier every caller passes first, land first."""
    gl.atomic_add(p_flags, 1, sem="release", scope="gpu")


@gluon.jit
def wait_count(p_flags, expected, p_err, code, timeout_ns, C: gl.constexpr):
    """Poll each CTA's flag (a [C] tensor of pointers) until it equals ``expected``, at most
    ``timeout_ns`` (0 once any wait of the launch has failed); a failed wait records ``code``."""
    budget = gl.where(gl.load(p_err, volatile=True) == 0, timeout_ns, 0)
    ok = gl.atomic_poll(p_flags, expected, sem="acquire", scope="gpu", timeout_ns=budget)
    gl.atomic_max(p_err + ranks(C) * 0, code, mask=~ok)


@gluon.jit
def wait_grid(p_sync, n, n_ctas, p_err, timeout_ns, C: gl.constexpr):
    """Wait until every CTA finished phase instance n (no wait for n < 0)."""
    if n >= 0:
        o_r = ranks(C)
        wait_count(p_sync + n + o_r * 0, n_ctas, p_err, n + 1, timeout_ns, C)


@gluon.jit
def proxy_fence():
    """Data written by ordinary stores of other SMs is read next by TMA (the async proxy)."""
    gl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


# ------------------------------------------------------------------------------------ items

@gluon.jit
def item(p_table, phase, cluster, i, n_clusters, max_items):
    """The fields of a cluster's i-th item of a phase (schedule.ITEM_FIELDS)."""
    p_row = p_table + ((phase * n_clusters + cluster) * max_items + i) * 6
    return (gl.load(p_row), gl.load(p_row + 1), gl.load(p_row + 2), gl.load(p_row + 3), gl.load(p_row + 4),
            gl.load(p_row + 5))


@gluon.jit
def phase_blocks(p_table, p_counts, phase, cluster, n_clusters, max_items):
    """K blocks a cluster walks in a phase (the ring stages it uses)."""
    total = 0
    for i in range(gl.load(p_counts + phase * n_clusters + cluster)):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
        total += kb_hi - kb_lo
    return total


# ------------------------------------------------------------------------------------ producer

@gluon.jit
def w_view(buf, desc, W_MODE: gl.constexpr):
    """A weight slot viewed as the descriptor's box, or 4 of them for the gates (the slots are
    shared by phases whose tiles have other shapes; every tile is ROWS x BK values per CTA)."""
    return buf.reinterpret(desc.dtype, w_shape(desc.block_shape, W_MODE), desc.layout)


@gluon.constexpr_function
def w_shape(block_shape, W_MODE):
    return ([4] if int(W_MODE) == 1 else []) + [int(d) for d in block_shape]


@gluon.constexpr_function
def w_bytes(desc_bytes, W_MODE):
    return int(desc_bytes) * (4 if int(W_MODE) == 1 else 1)


@gluon.jit
def _tma_w(desc, coord, bar, dst, KEEP: gl.constexpr):
    if KEEP:
        tma.async_load(desc, coord, bar, dst, cache_policy=KEEP_IN_L2)
    else:
        tma.async_load(desc, coord, bar, dst)


@gluon.jit
def load_w(desc, group, kb, bar, dst, H, C: gl.constexpr, ROWS: gl.constexpr, W_MODE: gl.constexpr,
           KEEP: gl.constexpr):
    """One weight tile (``KEEP``: with the evict-last policy). The gates are four boxes, rows
    g*H + the group's units of Wh [4H, H]: rows past H in a box belong to the next gate (or are
    out of bounds: zeros) and only fill accumulator rows of units >= H, which the epilogue never
    stores."""
    if W_MODE == W_KMAJOR:
        BK: gl.constexpr = desc.block_shape[1]
        _tma_w(desc, [group * (C * ROWS), kb * BK], bar, w_view(dst, desc, W_MODE), KEEP)
    elif W_MODE == W_GATES:
        BK: gl.constexpr = desc.block_shape[1]
        view = w_view(dst, desc, W_MODE)
        for gate in gl.static_range(4):
            _tma_w(desc, [gate * H + group * (C * (ROWS // 4)), kb * BK], bar, view.index(gate), KEEP)
    else:
        BK: gl.constexpr = desc.block_shape[0]
        _tma_w(desc, [kb * BK, group * (C * ROWS)], bar, w_view(dst, desc, W_MODE), KEEP)


@gluon.jit
def _stream_w(w_desc, g, kb, wbuf, ready, w_empty, s, ph, bytes, H, C: gl.constexpr, ROWS: gl.constexpr,
              W_MODE: gl.constexpr, RES_BLOCKS: gl.constexpr):
    """A streamed weight tile into ring stage s, once its previous use is released."""
    mbarrier.wait(w_empty.index(s), ph ^ 1)
    mbarrier.expect(ready.index(s), bytes)
    load_w(w_desc, g, kb, ready.index(s), wbuf.index(RES_BLOCKS + s), H, C, ROWS, W_MODE, RES_BLOCKS > 0)


@gluon.jit
def produce_phase(w_desc, a_desc, a_row, wbuf, a_ring, ready, w_empty, a_empty, p_table, p_counts, phase, cluster,
                  n_clusters, it, r0, p_sync, n, n_ctas, p_err, timeout_ns, H, C: gl.constexpr, S: gl.constexpr,
                  ROWS: gl.constexpr, W_MODE: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr, max_items):
    """The loads of one phase instance (its blocks are walk positions r0 + j): the streamed weight
    tiles among the first S before the grid flag (they do not depend on it: the next step's
    weights stream in while the CTA waits), the activation tiles (multicast by the lead CTA) after
    it. A resident position loads its activation only. Returns the ring position after the phase."""
    BK: gl.constexpr = a_desc.block_shape[1]
    a_bytes: gl.constexpr = a_desc.nbytes_per_cta
    both: gl.constexpr = w_bytes(w_desc.nbytes_per_cta, W_MODE) + a_bytes
    count = gl.load(p_counts + phase * n_clusters + cluster)
    if STREAM:
        j = 0
        for i in range(count):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
            for kb in range(kb_lo, kb_hi):
                if j < S:
                    if r0 + j >= RES_BLOCKS:
                        _stream_w(w_desc, g, kb, wbuf, ready, w_empty, (it + j) % S, ((it + j) // S) & 1, both, H,
                                  C, ROWS, W_MODE, RES_BLOCKS)
                j += 1
    wait_grid(p_sync, n - 1, n_ctas, p_err, timeout_ns, C)
    proxy_fence()
    j = 0
    for i in range(count):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
        for kb in range(kb_lo, kb_hi):
            s = (it + j) % S
            ph = ((it + j) // S) & 1
            if STREAM:
                if r0 + j >= RES_BLOCKS:
                    if j >= S:
                        _stream_w(w_desc, g, kb, wbuf, ready, w_empty, s, ph, both, H, C, ROWS, W_MODE, RES_BLOCKS)
                else:
                    mbarrier.expect(ready.index(s), a_bytes)
            else:
                mbarrier.expect(ready.index(s), a_bytes)
            mbarrier.wait(a_empty.index(s), ph ^ 1)
            tma.async_load(a_desc, [a_row, kb * BK], ready.index(s), a_ring.index(s), multicast=True)
            j += 1
    return it + j


@gluon.jit
def load_resident(w0_desc, w1_desc, wbuf, res_ready, p_table, p_counts, cluster, n_clusters, H, C: gl.constexpr,
                  ROWS: gl.constexpr, W0_MODE: gl.constexpr, W1_MODE: gl.constexpr, RES_BLOCKS: gl.constexpr,
                  max_items):
    """The first RES_BLOCKS weight tiles of this CTA's walk, loaded once per call (tile r completes
    barrier res_ready[r])."""
    r = 0
    for phase in gl.static_range(2):
        for i in range(gl.load(p_counts + phase * n_clusters + cluster)):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
            for kb in range(kb_lo, kb_hi):
                if r < RES_BLOCKS:
                    if phase == 0:
                        mbarrier.expect(res_ready.index(r), w_bytes(w0_desc.nbytes_per_cta, W0_MODE))
                        load_w(w0_desc, g, kb, res_ready.index(r), wbuf.index(r), H, C, ROWS, W0_MODE, False)
                    else:
                        mbarrier.expect(res_ready.index(r), w_bytes(w1_desc.nbytes_per_cta, W1_MODE))
                        load_w(w1_desc, g, kb, res_ready.index(r), wbuf.index(r), H, C, ROWS, W1_MODE, False)
                r += 1


@gluon.jit
def wait_resident(res_ready, p_table, p_counts, cluster, n_clusters, RES_BLOCKS: gl.constexpr, max_items):
    total = phase_blocks(p_table, p_counts, 0, cluster, n_clusters, max_items)
    total += phase_blocks(p_table, p_counts, 1, cluster, n_clusters, max_items)
    for r in range(gl.minimum(total, RES_BLOCKS)):
        mbarrier.wait(res_ready.index(r), 0)


# ------------------------------------------------------------------------------------ consumers

@gluon.jit
def release(w_empty, a_empty, s, STREAM: gl.constexpr):
    if STREAM:
        mbarrier.arrive(w_empty.index(s))
    mbarrier.arrive(a_empty.index(s))


@gluon.jit
def w_slot(r, s, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr):
    """The weight buffer's slot of walk position r at ring stage s: resident below RES_BLOCKS."""
    if STREAM:
        if RES_BLOCKS > 0:
            resident = (r < RES_BLOCKS).to(gl.int32)
            slot = resident * r + (1 - resident) * (RES_BLOCKS + s)
        else:
            slot = s
    else:
        slot = r
    return slot


@gluon.jit
def mma_rows(w_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r0, n_kb, C: gl.constexpr, BB: gl.constexpr,
             S: gl.constexpr, ROWS: gl.constexpr, W_MODE: gl.constexpr, RES_BLOCKS: gl.constexpr,
             STREAM: gl.constexpr):
    """acc [C*ROWS, BB] = W_tile [C*ROWS, K range] @ act^T over n_kb blocks (the tile viewed as
    ``w_desc``'s box, transposed for W_MNMAJOR); one MMA in flight while the previous stage is
    released."""
    acc = gl.zeros([C * ROWS, BB], gl.float32, acc_layout(C, BB, ROWS, False))
    for j in range(n_kb):
        s = (it + j) % S
        mbarrier.wait(ready.index(s), ((it + j) // S) & 1)
        w = w_view(wbuf.index(w_slot(r0 + j, s, RES_BLOCKS, STREAM)), w_desc, W_MODE)
        if W_MODE == W_MNMAJOR:
            w = w.permute((1, 0))
        acc = warpgroup_mma(w, a_ring.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        if j > 0:
            release(w_empty, a_empty, (it + j - 1) % S, STREAM)
    acc = warpgroup_mma_wait(0, deps=[acc])
    if n_kb > 0:
        release(w_empty, a_empty, (it + n_kb - 1) % S, STREAM)
    return acc


@gluon.jit
def mma_gates(w_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r0, n_kb, C: gl.constexpr, BB: gl.constexpr,
              S: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr):
    """The 256-row gate product: four accumulators [C*64, BB] (i, f, o, u) from one [4, C*64, BK] tile."""
    layout: gl.constexpr = acc_layout(C, BB, 256, True)
    acc_i = gl.zeros([C * 64, BB], gl.float32, layout)
    acc_f = gl.zeros([C * 64, BB], gl.float32, layout)
    acc_o = gl.zeros([C * 64, BB], gl.float32, layout)
    acc_u = gl.zeros([C * 64, BB], gl.float32, layout)
    for j in range(n_kb):
        s = (it + j) % S
        mbarrier.wait(ready.index(s), ((it + j) // S) & 1)
        w = w_view(wbuf.index(w_slot(r0 + j, s, RES_BLOCKS, STREAM)), w_desc, W_GATES)
        b = a_ring.index(s).permute((1, 0))
        acc_i = warpgroup_mma(w.index(0), b, acc_i, is_async=True)
        acc_f = warpgroup_mma(w.index(1), b, acc_f, is_async=True)
        acc_o = warpgroup_mma(w.index(2), b, acc_o, is_async=True)
        acc_u = warpgroup_mma(w.index(3), b, acc_u, is_async=True)
        # The four MMAs of this stage stay in flight; those of the previous stage are done.
        acc_i, acc_f, acc_o, acc_u = warpgroup_mma_wait(4, deps=[acc_i, acc_f, acc_o, acc_u])
        if j > 0:
            release(w_empty, a_empty, (it + j - 1) % S, STREAM)
    acc_i, acc_f, acc_o, acc_u = warpgroup_mma_wait(0, deps=[acc_i, acc_f, acc_o, acc_u])
    if n_kb > 0:
        release(w_empty, a_empty, (it + n_kb - 1) % S, STREAM)
    return acc_i, acc_f, acc_o, acc_u
