"""Pieces both persistent Gluon kernels share (sm_90a): layouts, the grid flags, the TMA producer,
the warpgroup-MMA main loops, partial tiles and their fixed-order reduction.

Legend (as in :mod:`.schedule`)
    C  CTAs per cluster (one Gluon program is a cluster: tensors whose layout splits dimension 0
       over the CTAs hold each CTA's own rows, so "rank" is the index of that split)
    ROWS = 256 output rows per CTA tile (hidden units; for the gate product 64 units x 4 gates)
    BK reduction block, BB batch columns (the MMA's N), S ring stages
    EM x EB the epilogue's chunk (units x batch rows), 8 values per thread at 8 warps
    p_ pointers, b_ register tiles, o_ offsets, k_ masks, n_ counts

Partitions (gl.warp_specialize): the default partition (8 warps, two consumer warpgroups) issues
the warpgroup MMAs and runs the epilogues; one producer warp issues every TMA load. Per ring
stage s: ``ready[s]`` (the stage's bytes landed; one per CTA), ``w_empty[s]`` (this CTA's
consumers are done with the weight tile), ``a_empty[s]`` (one barrier for the cluster, in the lead
CTA: every CTA's consumers are done with the activation tile, so the lead may multicast the next
one into all of them).

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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Module constants are gl.constexpr so that the kernels can read them.
ROWS = gl.constexpr(256)
GATE_UNITS = gl.constexpr(64)
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
W_GATES = gl.constexpr(1)    # 4 x [C*64, BK]: 64 units of each gate, K contiguous (forward z)
W_MNMAJOR = gl.constexpr(2)  # [BK, C*ROWS], the rows contiguous (backward: W read transposed)


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
def acc_layout(C, BB, gates):
    """The accumulator: [C*ROWS, BB] over 8 warps (two warpgroups along the rows) or, for the
    gate product, [C*64, BB] per gate with the two warpgroups splitting the batch columns."""
    if gates:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, int(BB) // 2, 16],
                                         cga_layout=split_dim(C, 2, 0))
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, int(BB), 16],
                                     cga_layout=split_dim(C, 2, 0))


@gluon.constexpr_function
def epi_layout(C):
    """[C*EM, EB] epilogue chunks, units fastest (the state tensors are [B, H], units contiguous)."""
    return gl.BlockedLayout([2, 1], [32, 1], [1, int(CONSUMER_WARPS)], [0, 1], cga_layout=split_dim(C, 2, 0))


@gluon.constexpr_function
def rank_layout(C, warps):
    """One element per CTA: the per-CTA flag operations (one thread of each CTA performs them)."""
    return gl.BlockedLayout([1], [32], [int(warps)], [0], cga_layout=split_dim(C, 1, 0))


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
    """A weight slot viewed as the descriptor's box, or 4 of them for the gates (the ring is
    shared by phases whose tiles have other shapes; every tile is 256 x BK values per CTA)."""
    return buf.reinterpret(desc.dtype, w_shape(desc.block_shape, W_MODE), desc.layout)


@gluon.constexpr_function
def w_shape(block_shape, W_MODE):
    return ([4] if int(W_MODE) == 1 else []) + [int(d) for d in block_shape]


@gluon.constexpr_function
def w_bytes(desc_bytes, W_MODE):
    return int(desc_bytes) * (4 if int(W_MODE) == 1 else 1)


@gluon.jit
def load_w(desc, group, kb, bar, dst, H, C: gl.constexpr, W_MODE: gl.constexpr):
    """One weight tile. The gates are four boxes, rows g*H + the group's units of Wh [4H, H]:
    rows past H in a box belong to the next gate (or are out of bounds: zeros) and only fill
    accumulator rows of units >= H, which the epilogue never stores."""
    if W_MODE == W_KMAJOR:
        BK: gl.constexpr = desc.block_shape[1]
        tma.async_load(desc, [group * (C * ROWS), kb * BK], bar, w_view(dst, desc, W_MODE))
    elif W_MODE == W_GATES:
        BK: gl.constexpr = desc.block_shape[1]
        view = w_view(dst, desc, W_MODE)
        for gate in gl.static_range(4):
            tma.async_load(desc, [gate * H + group * (C * GATE_UNITS), kb * BK], bar, view.index(gate))
    else:
        BK: gl.constexpr = desc.block_shape[0]
        tma.async_load(desc, [kb * BK, group * (C * ROWS)], bar, w_view(dst, desc, W_MODE))


@gluon.jit
def produce_phase(w_desc, a_desc, a_row, w_ring, a_ring, ready, w_empty, a_empty, p_table, p_counts, phase, cluster,
                  n_clusters, it, p_sync, n, n_ctas, p_err, timeout_ns, H, C: gl.constexpr, S: gl.constexpr,
                  W_MODE: gl.constexpr, RESIDENT: gl.constexpr, max_items):
    """The loads of one phase instance: the first S weight tiles before the grid flag (they do
    not depend on it: the next step's weights stream in while the CTA waits), the activation
    tiles (multicast by the lead CTA) after it. Returns the ring position after the phase."""
    BK: gl.constexpr = a_desc.block_shape[1]
    a_bytes: gl.constexpr = a_desc.nbytes_per_cta
    w_nbytes: gl.constexpr = 0 if RESIDENT else w_bytes(w_desc.nbytes_per_cta, W_MODE)
    count = gl.load(p_counts + phase * n_clusters + cluster)
    pre = 0
    if not RESIDENT:
        for i in range(count):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
            for kb in range(kb_lo, kb_hi):
                if pre < S:
                    s = (it + pre) % S
                    mbarrier.wait(w_empty.index(s), ((it + pre) // S) & 1 ^ 1)
                    mbarrier.expect(ready.index(s), w_nbytes + a_bytes)
                    load_w(w_desc, g, kb, ready.index(s), w_ring.index(s), H, C, W_MODE)
                    pre += 1
    wait_grid(p_sync, n - 1, n_ctas, p_err, timeout_ns, C)
    proxy_fence()
    j = 0
    for i in range(count):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
        for kb in range(kb_lo, kb_hi):
            s = (it + j) % S
            ph = ((it + j) // S) & 1
            if j >= pre:
                if not RESIDENT:
                    mbarrier.wait(w_empty.index(s), ph ^ 1)
                mbarrier.expect(ready.index(s), w_nbytes + a_bytes)
                if not RESIDENT:
                    load_w(w_desc, g, kb, ready.index(s), w_ring.index(s), H, C, W_MODE)
            mbarrier.wait(a_empty.index(s), ph ^ 1)
            tma.async_load(a_desc, [a_row, kb * BK], ready.index(s), a_ring.index(s), multicast=True)
            j += 1
    return it + j


@gluon.jit
def load_resident(w0_desc, w1_desc, res, res_ready, p_table, p_counts, cluster, n_clusters, H, C: gl.constexpr,
                  W0_MODE: gl.constexpr, W1_MODE: gl.constexpr, max_items):
    """Stationary design: every weight tile this CTA uses, loaded once, in walk order (tile r
    completes barrier res_ready[r])."""
    r = 0
    for phase in gl.static_range(2):
        for i in range(gl.load(p_counts + phase * n_clusters + cluster)):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, phase, cluster, i, n_clusters, max_items)
            for kb in range(kb_lo, kb_hi):
                if phase == 0:
                    mbarrier.expect(res_ready.index(r), w_bytes(w0_desc.nbytes_per_cta, W0_MODE))
                    load_w(w0_desc, g, kb, res_ready.index(r), res.index(r), H, C, W0_MODE)
                else:
                    mbarrier.expect(res_ready.index(r), w_bytes(w1_desc.nbytes_per_cta, W1_MODE))
                    load_w(w1_desc, g, kb, res_ready.index(r), res.index(r), H, C, W1_MODE)
                r += 1


@gluon.jit
def wait_resident(res_ready, p_table, p_counts, cluster, n_clusters, max_items):
    total = phase_blocks(p_table, p_counts, 0, cluster, n_clusters, max_items)
    total += phase_blocks(p_table, p_counts, 1, cluster, n_clusters, max_items)
    for r in range(total):
        mbarrier.wait(res_ready.index(r), 0)


# ------------------------------------------------------------------------------------ consumers

@gluon.jit
def release(w_empty, a_empty, s, RESIDENT: gl.constexpr):
    if not RESIDENT:
        mbarrier.arrive(w_empty.index(s))
    mbarrier.arrive(a_empty.index(s))


@gluon.jit
def weight_tile(w_ring, res, s, r, w_desc, W_MODE: gl.constexpr, RESIDENT: gl.constexpr):
    if RESIDENT:
        tile = w_view(res.index(r), w_desc, W_MODE)
    else:
        tile = w_view(w_ring.index(s), w_desc, W_MODE)
    return tile


@gluon.jit
def mma_rows(w_desc, w_ring, res, a_ring, ready, w_empty, a_empty, it, r0, n_kb, C: gl.constexpr, BB: gl.constexpr,
             S: gl.constexpr, MN_MAJOR: gl.constexpr, RESIDENT: gl.constexpr):
    """acc [C*ROWS, BB] = W_tile [C*ROWS, K range] @ act^T over n_kb blocks; one MMA in flight
    while the previous stage is released."""
    acc = gl.zeros([C * ROWS, BB], gl.float32, acc_layout(C, BB, False))
    for j in range(n_kb):
        s = (it + j) % S
        mbarrier.wait(ready.index(s), ((it + j) // S) & 1)
        w = weight_tile(w_ring, res, s, r0 + j, w_desc, W_MNMAJOR if MN_MAJOR else W_KMAJOR, RESIDENT)
        if MN_MAJOR:
            w = w.permute((1, 0))
        acc = warpgroup_mma(w, a_ring.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        if j > 0:
            release(w_empty, a_empty, (it + j - 1) % S, RESIDENT)
    acc = warpgroup_mma_wait(0, deps=[acc])
    if n_kb > 0:
        release(w_empty, a_empty, (it + n_kb - 1) % S, RESIDENT)
    return acc


@gluon.jit
def mma_gates(w_desc, w_ring, res, a_ring, ready, w_empty, a_empty, it, r0, n_kb, C: gl.constexpr, BB: gl.constexpr,
              S: gl.constexpr, RESIDENT: gl.constexpr):
    """The gate product: four accumulators [C*64, BB] (i, f, o, u) from one [4, C*64, BK] tile."""
    layout: gl.constexpr = acc_layout(C, BB, True)
    acc_i = gl.zeros([C * GATE_UNITS, BB], gl.float32, layout)
    acc_f = gl.zeros([C * GATE_UNITS, BB], gl.float32, layout)
    acc_o = gl.zeros([C * GATE_UNITS, BB], gl.float32, layout)
    acc_u = gl.zeros([C * GATE_UNITS, BB], gl.float32, layout)
    for j in range(n_kb):
        s = (it + j) % S
        mbarrier.wait(ready.index(s), ((it + j) // S) & 1)
        w = weight_tile(w_ring, res, s, r0 + j, w_desc, W_GATES, RESIDENT)
        b = a_ring.index(s).permute((1, 0))
        acc_i = warpgroup_mma(w.index(0), b, acc_i, is_async=True)
        acc_f = warpgroup_mma(w.index(1), b, acc_f, is_async=True)
        acc_o = warpgroup_mma(w.index(2), b, acc_o, is_async=True)
        acc_u = warpgroup_mma(w.index(3), b, acc_u, is_async=True)
        # The four MMAs of this stage stay in flight; those of the previous stage are done.
        acc_i, acc_f, acc_o, acc_u = warpgroup_mma_wait(4, deps=[acc_i, acc_f, acc_o, acc_u])
        if j > 0:
            release(w_empty, a_empty, (it + j - 1) % S, RESIDENT)
    acc_i, acc_f, acc_o, acc_u = warpgroup_mma_wait(0, deps=[acc_i, acc_f, acc_o, acc_u])
    if n_kb > 0:
        release(w_empty, a_empty, (it + n_kb - 1) % S, RESIDENT)
    return acc_i, acc_f, acc_o, acc_u


@gluon.jit
def store_partial(acc, p_ws, block, row0, B, C: gl.constexpr, BB: gl.constexpr):
    """The cluster's float32 partials into workspace block ``block``, laid out [B, C*ROWS] (units
    contiguous, as the epilogue reads them): accumulator row r goes to block row row0 + r (rank
    k's rows of a 256-row tile at k*256; of a gate, at gate*C*64 + k*64)."""
    layout: gl.constexpr = acc.type.layout
    o_row = gl.arange(0, acc.shape[0], gl.SliceLayout(1, layout))
    o_b = gl.arange(0, BB, gl.SliceLayout(0, layout))
    p_block = p_ws + block.to(gl.int64) * B * (C * ROWS)
    gl.store(p_block + o_b[None, :] * (C * ROWS) + (row0 + o_row)[:, None], acc, mask=(o_b < B)[None, :])


@gluon.jit
def _part(p_ws, block, stride, o_ws, mask):
    # .cg: the partials were written by other SMs.
    return gl.load(p_ws + block.to(gl.int64) * stride + o_ws, mask=mask, other=0.0, cache_modifier=".cg")


@gluon.jit
def gather(p_ws, block0, parts, o_row, o_b, k_nb, B, C: gl.constexpr):
    """Sum of a chunk's parts (block rows o_row, batch rows o_b) in part order, GATHER parts
    loaded per round (all in flight together): bitwise the same whoever stored first."""
    b_sum = gl.zeros([C * EPI_M, EPI_B], gl.float32, epi_layout(C))
    o_ws = o_b[None, :] * (C * ROWS) + o_row[:, None]
    stride = B * (C * ROWS)
    for p0 in range(0, parts, GATHER):
        b_0 = _part(p_ws, block0 + p0, stride, o_ws, k_nb)
        b_1 = _part(p_ws, block0 + p0 + 1, stride, o_ws, k_nb & (p0 + 1 < parts))
        b_2 = _part(p_ws, block0 + p0 + 2, stride, o_ws, k_nb & (p0 + 2 < parts))
        b_3 = _part(p_ws, block0 + p0 + 3, stride, o_ws, k_nb & (p0 + 3 < parts))
        b_sum = b_sum + b_0 + b_1 + b_2 + b_3
    return b_sum


@gluon.jit
def _gate_round(b_sum, p_ws, block, stride, o_ws, k_nb, p0, parts):
    b_0 = _part(p_ws, block, stride, o_ws, k_nb)
    b_1 = _part(p_ws, block + 1, stride, o_ws, k_nb & (p0 + 1 < parts))
    return b_sum + b_0 + b_1


@gluon.jit
def gather_gates(p_ws, block0, parts, o_row, o_b, k_nb, B, C: gl.constexpr):
    """The four gates' sums of a chunk (gate g's rows at g * C * 64 + o_row), each in part order;
    a round loads GATE_GATHER parts of every gate (one basic block: all in flight together)."""
    b_i = gl.zeros([C * EPI_M, EPI_B], gl.float32, epi_layout(C))
    b_f = gl.zeros([C * EPI_M, EPI_B], gl.float32, epi_layout(C))
    b_o = gl.zeros([C * EPI_M, EPI_B], gl.float32, epi_layout(C))
    b_u = gl.zeros([C * EPI_M, EPI_B], gl.float32, epi_layout(C))
    o_ws = o_b[None, :] * (C * ROWS) + o_row[:, None]
    gate = C * GATE_UNITS
    stride = B * (C * ROWS)
    for p0 in range(0, parts, GATE_GATHER):
        b_i = _gate_round(b_i, p_ws, block0 + p0, stride, o_ws, k_nb, p0, parts)
        b_f = _gate_round(b_f, p_ws, block0 + p0, stride, o_ws + gate, k_nb, p0, parts)
        b_o = _gate_round(b_o, p_ws, block0 + p0, stride, o_ws + 2 * gate, k_nb, p0, parts)
        b_u = _gate_round(b_u, p_ws, block0 + p0, stride, o_ws + 3 * gate, k_nb, p0, parts)
    return b_i, b_f, b_o, b_u


@gluon.jit
def chunk_index(group, u0, b0, UNITS: gl.constexpr, C: gl.constexpr):
    """An epilogue chunk: units [u0, u0 + EM) of each CTA's tile (tile group * C + rank) and
    batch rows [b0, b0 + EB). Returns (unit, rank, unit offset in the tile, batch row)."""
    layout: gl.constexpr = epi_layout(C)
    o_r = gl.arange(0, C * EPI_M, gl.SliceLayout(1, layout))
    o_b = b0 + gl.arange(0, EPI_B, gl.SliceLayout(0, layout))
    rank = o_r // EPI_M
    o_u = u0 + o_r % EPI_M
    return (group * C + rank) * UNITS + o_u, rank, o_u, o_b


@gluon.jit
def contribute(p_tickets, tile_base, group, parts, C: gl.constexpr):
    """After a contribution's partial stores (pass 1): every thread's stores ordered before what
    follows; a split tile's part counts itself on the tile's ticket."""
    gl.barrier()
    if parts > 1:
        arrive_each(p_tickets + tile_base + group * C + ranks(C))


@gluon.jit
def take_over(p_tickets, tile_base, group, parts, n, p_err, timeout_ns, C: gl.constexpr):
    """Before a contribution's slice of the finish (pass 2): a split tile's every part stored
    (``schedule.ticket_target``: phase instance n is its tiles' (n // 2 + 1)-th use)."""
    if parts > 1:
        wait_count(p_tickets + tile_base + group * C + ranks(C), parts * (n // 2 + 1), p_err, n + 1, timeout_ns, C)


@gluon.jit
def finish_chunks(part, parts, n_chunks):
    """Chunks [lo, hi) of its tile that part ``part`` of ``parts`` finishes (schedule.finish_slice)."""
    return part * n_chunks // parts, (part + 1) * n_chunks // parts


@gluon.jit
def finish_phase(p_sync, n, C: gl.constexpr):
    """This CTA's epilogues of phase instance n are stored: count it on the grid flag. (The next
    phase reads some of what they stored by TMA: the proxy fence here and after the wait.)"""
    proxy_fence()
    gl.barrier()
    arrive_each(p_sync + n + ranks(C) * 0)
