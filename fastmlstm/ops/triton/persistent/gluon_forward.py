"""The persistent forward kernel (Gluon, sm_90a): every step of a call in one launch.

Legend as in :mod:`.gluon_common`; T steps, B rows, H units. Phase instance n = 2 t + p. The tile
height ROWS (256 or 64), the resident weight tiles (RES_BLOCKS) and whether others stream (STREAM)
are compile-time: one kernel serves both designs (``targets.constexprs``).

    phase 0 "hm":  hm = h_{t-1} Wmh^T (K = H)   epilogue m = xm * hm -> m buffer (and act xm, hm)
    phase 1 "z":   z = m Wh^T + xg (K = H)      epilogue gates, c_t, h_t (and act gates)

Buffers the host lays out (:mod:`.launch`): ``h`` [T+1, B, H] with h[0] = h0 and h[t+1] = h_t
(the output is h[1:]), ``c`` [c_mod, B, H] float32 with c[0] = c0 and c_t in c[(t+1) % c_mod]
(c_mod = T+1 keeps every cell state, 2 ping-pongs), ``m`` [B, H]. The activation operands are
read by TMA from ``h`` (rows t*B ...) and ``m``; rows past B belong to other steps or are out of
bounds: they only fill MMA columns the epilogue never stores.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gluon_common import (
    EPI_B, EPI_M, PRODUCER_REGS, W_GATES, W_KMAJOR, epi_cols, item, load_resident, mma_gates, mma_rows, phase_blocks,
    pipeline_buffers, produce_phase, wait_grid, wait_resident,
)
from .gluon_finish import (
    chunk_index, contribute, finish_chunks, finish_phase, gather, gather_gates, store_partial, take_over,
)


@gluon.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for very negative x: 1 / inf = 0, never NaN.
    return 1.0 / (1.0 + gl.exp(-x))


@gluon.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@gluon.jit
def epilogue_hm(p_ws, slot0, parts, group, t, B, H, p_proj, p_act, p_m, c_lo, c_hi, SAVE: gl.constexpr,
                C: gl.constexpr, ROWS: gl.constexpr):
    """m = xm * hm for chunks [c_lo, c_hi) of the CTA's ROWS units (units-major, EPI_M x EPI_B
    each; hm summed over the parts in order)."""
    n_b = gl.cdiv(B, EPI_B)
    for c in range(c_lo, c_hi):
        o_n, rank, o_u, o_b = chunk_index(group, (c // n_b) * EPI_M, (c % n_b) * EPI_B, ROWS, C, EPI_M)
        k_nb = (o_n < H)[:, None] & (o_b < B)[None, :]
        o_bt = (t * B + o_b).to(gl.int64)
        # The operand before the parts: its HBM latency overlaps the gather's L2 round trips.
        b_xm = gl.load(p_proj + o_bt[None, :] * (5 * H) + 4 * H + o_n[:, None], mask=k_nb, other=0.0)
        b_hm = gather(p_ws, slot0, parts, rank * ROWS + o_u, o_b, k_nb, B, C, ROWS, EPI_M)
        b_m = b_hm * b_xm.to(gl.float32)
        gl.store(p_m + o_b[None, :] * H + o_n[:, None], b_m.to(p_m.dtype.element_ty), mask=k_nb)
        if SAVE:
            p_a = p_act + o_bt[None, :] * (6 * H) + o_n[:, None]
            gl.store(p_a + 4 * H, b_xm, mask=k_nb)
            gl.store(p_a + 5 * H, b_hm.to(p_act.dtype.element_ty), mask=k_nb)


@gluon.constexpr_function
def gate_geometry(C, ROWS):
    """(units of each gate per tile, rows between a rank's units, rows between gates) in the
    workspace: four accumulators for a 256-row tile, one gate-major accumulator for 64 rows."""
    C, ROWS = int(C), int(ROWS)
    units = ROWS // 4
    return (units, units, C * units) if ROWS == 256 else (units, ROWS, units)


@gluon.jit
def epilogue_z(p_ws, slot0, parts, group, t, B, H, p_proj, p_h, p_c, c_mod, p_act, p_len, c_lo, c_hi,
               SAVE: gl.constexpr, HAS_LEN: gl.constexpr, C: gl.constexpr, ROWS: gl.constexpr):
    """Gates, c_t and h_t for chunks [c_lo, c_hi) of the CTA's ROWS / 4 units (of each gate; a
    chunk is all of them x EB batch rows): z summed over the parts in order."""
    GU: gl.constexpr = gate_geometry(C, ROWS)[0]
    RANK_ROWS: gl.constexpr = gate_geometry(C, ROWS)[1]
    GATE_STEP: gl.constexpr = gate_geometry(C, ROWS)[2]
    EB: gl.constexpr = epi_cols(GU)
    plane = B * H
    for c in range(c_lo, c_hi):
        o_n, rank, o_u, o_b = chunk_index(group, 0, c * EB, GU, C, GU)
        k_nb = (o_n < H)[:, None] & (o_b < B)[None, :]
        o_bt = (t * B + o_b).to(gl.int64)
        o_state = o_b[None, :] * H + o_n[:, None]
        # The operands before the parts: their HBM latency overlaps the gather's L2 round trips.
        p_x = p_proj + o_bt[None, :] * (5 * H) + o_n[:, None]
        b_xi = gl.load(p_x, mask=k_nb, other=0.0)
        b_xf = gl.load(p_x + H, mask=k_nb, other=0.0)
        b_xo = gl.load(p_x + 2 * H, mask=k_nb, other=0.0)
        b_xu = gl.load(p_x + 3 * H, mask=k_nb, other=0.0)
        b_c_prev = gl.load(p_c + (t % c_mod).to(gl.int64) * plane + o_state, mask=k_nb, other=0.0,
                           cache_modifier=".cg")
        if HAS_LEN:
            b_active = (t < gl.load(p_len + o_b, mask=o_b < B, other=0))[None, :]
            b_h_prev = gl.load(p_h + t.to(gl.int64) * plane + o_state, mask=k_nb, other=0.0, cache_modifier=".cg")
        z_i, z_f, z_o, z_u = gather_gates(p_ws, slot0, parts, rank * RANK_ROWS + o_u, GATE_STEP, o_b, k_nb, B, C,
                                          ROWS, GU)
        b_i = _sigmoid(z_i + b_xi.to(gl.float32))
        b_f = _sigmoid(z_f + b_xf.to(gl.float32))
        b_o = _sigmoid(z_o + b_xo.to(gl.float32))
        b_u = _tanh(z_u + b_xu.to(gl.float32))
        b_c = b_f * b_c_prev + b_i * b_u
        b_h = b_o * _tanh(b_c)
        if HAS_LEN:
            # A row past its length keeps its state: h and c are carried through unchanged.
            b_c = gl.where(b_active, b_c, b_c_prev)
            b_h = gl.where(b_active, b_h, b_h_prev.to(gl.float32))
        gl.store(p_c + ((t + 1) % c_mod).to(gl.int64) * plane + o_state, b_c, mask=k_nb)
        gl.store(p_h + (t + 1).to(gl.int64) * plane + o_state, b_h.to(p_h.dtype.element_ty), mask=k_nb)
        if SAVE:
            dtype = p_act.dtype.element_ty
            p_a = p_act + o_bt[None, :] * (6 * H) + o_n[:, None]
            gl.store(p_a, b_i.to(dtype), mask=k_nb)
            gl.store(p_a + H, b_f.to(dtype), mask=k_nb)
            gl.store(p_a + 2 * H, b_o.to(dtype), mask=k_nb)
            gl.store(p_a + 3 * H, b_u.to(dtype), mask=k_nb)


@gluon.jit
def _z_contribution(w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, n_kb, p_ws, block, B,
                    C: gl.constexpr, BB: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr,
                    STREAM: gl.constexpr):
    """The gate product over one item's blocks, its partials stored: four accumulators for a
    256-row tile, one (rows gate-major, the tile viewed as a Wmh box) for 64 rows."""
    if ROWS == 256:
        acc_i, acc_f, acc_o, acc_u = mma_gates(w1_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, n_kb, C, BB, S,
                                               RES_BLOCKS, STREAM)
        store_partial(acc_i, p_ws, block, 0, B, C, BB, ROWS)
        store_partial(acc_f, p_ws, block, C * 64, B, C, BB, ROWS)
        store_partial(acc_o, p_ws, block, 2 * C * 64, B, C, BB, ROWS)
        store_partial(acc_u, p_ws, block, 3 * C * 64, B, C, BB, ROWS)
    else:
        acc = mma_rows(w0_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, n_kb, C, BB, S, ROWS, W_KMAJOR,
                       RES_BLOCKS, STREAM)
        store_partial(acc, p_ws, block, 0, B, C, BB, ROWS)


@gluon.jit
def forward_consumer(w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, p_proj, p_h, p_c, c_mod,
                     p_act, p_m, p_len, p_ws, p_tickets, p_sync, p_err, p_table, p_counts, T, B, H, n_clusters, n_ctas,
                     tile_base1, timeout_ns, C: gl.constexpr, BB: gl.constexpr, S: gl.constexpr, SAVE: gl.constexpr,
                     HAS_LEN: gl.constexpr, ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr,
                     max_items):
    cluster = gl.program_id(0)
    if RES_BLOCKS > 0:
        wait_resident(res_ready, p_table, p_counts, cluster, n_clusters, RES_BLOCKS, max_items)
    r1 = phase_blocks(p_table, p_counts, 0, cluster, n_clusters, max_items)
    n_b = gl.cdiv(B, EPI_B)
    n_bz = gl.cdiv(B, epi_cols(ROWS // 4))
    count0 = gl.load(p_counts + cluster)
    count1 = gl.load(p_counts + n_clusters + cluster)
    it = 0
    for t in range(T):
        n = 2 * t
        wait_grid(p_sync, n - 1, n_ctas, p_err, timeout_ns, C)
        r = 0
        for i in range(count0):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 0, cluster, i, n_clusters, max_items)
            acc = mma_rows(w0_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, kb_hi - kb_lo, C, BB, S, ROWS,
                           W_KMAJOR, RES_BLOCKS, STREAM)
            store_partial(acc, p_ws, slot0 + part, 0, B, C, BB, ROWS)
            it += kb_hi - kb_lo
            r += kb_hi - kb_lo
            contribute(p_tickets, 0, g, parts, C)
        for i in range(count0):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 0, cluster, i, n_clusters, max_items)
            take_over(p_tickets, 0, g, parts, n, p_err, timeout_ns, C)
            c_lo, c_hi = finish_chunks(part, parts, (ROWS // EPI_M) * n_b)
            epilogue_hm(p_ws, slot0, parts, g, t, B, H, p_proj, p_act, p_m, c_lo, c_hi, SAVE, C, ROWS)
        finish_phase(p_sync, n, C)

        n = 2 * t + 1
        wait_grid(p_sync, n - 1, n_ctas, p_err, timeout_ns, C)
        r = r1
        for i in range(count1):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 1, cluster, i, n_clusters, max_items)
            _z_contribution(w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, kb_hi - kb_lo, p_ws,
                            slot0 + part, B, C, BB, S, ROWS, RES_BLOCKS, STREAM)
            it += kb_hi - kb_lo
            r += kb_hi - kb_lo
            contribute(p_tickets, tile_base1, g, parts, C)
        for i in range(count1):
            g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 1, cluster, i, n_clusters, max_items)
            take_over(p_tickets, tile_base1, g, parts, n, p_err, timeout_ns, C)
            c_lo, c_hi = finish_chunks(part, parts, n_bz)
            epilogue_z(p_ws, slot0, parts, g, t, B, H, p_proj, p_h, p_c, c_mod, p_act, p_len, c_lo, c_hi, SAVE,
                       HAS_LEN, C, ROWS)
        finish_phase(p_sync, n, C)


@gluon.jit
def forward_producer(w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, h_desc, m_desc, p_sync, p_err,
                     p_table, p_counts, T, B, H, n_clusters, n_ctas, timeout_ns, C: gl.constexpr, S: gl.constexpr,
                     ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr, max_items):
    cluster = gl.program_id(0)
    if RES_BLOCKS > 0:
        load_resident(w0_desc, w1_desc, wbuf, res_ready, p_table, p_counts, cluster, n_clusters, H, C, ROWS, W_KMAJOR,
                      W_GATES, RES_BLOCKS, max_items)
    r1 = phase_blocks(p_table, p_counts, 0, cluster, n_clusters, max_items)
    it = 0
    for t in range(T):
        it = produce_phase(w0_desc, h_desc, t * B, wbuf, a_ring, ready, w_empty, a_empty, p_table, p_counts, 0,
                           cluster, n_clusters, it, 0, p_sync, 2 * t, n_ctas, p_err, timeout_ns, H, C, S, ROWS,
                           W_KMAJOR, RES_BLOCKS, STREAM, max_items)
        it = produce_phase(w1_desc, m_desc, 0, wbuf, a_ring, ready, w_empty, a_empty, p_table, p_counts, 1,
                           cluster, n_clusters, it, r1, p_sync, 2 * t + 1, n_ctas, p_err, timeout_ns, H, C, S, ROWS,
                           W_GATES, RES_BLOCKS, STREAM, max_items)


@gluon.jit(do_not_specialize=["T", "B", "H", "c_mod", "n_clusters", "n_ctas", "tile_base1", "max_items"])
def forward_kernel(w0_desc, w1_desc, h_desc, m_desc, p_proj, p_h, p_c, p_act, p_m, p_len, p_ws, p_tickets, p_sync,
                   p_err, p_table, p_counts, T, B, H, c_mod, n_clusters, n_ctas, tile_base1, max_items, timeout_ns,
                   C: gl.constexpr, BB: gl.constexpr, S: gl.constexpr, SAVE: gl.constexpr, HAS_LEN: gl.constexpr,
                   ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr):
    """One launch of the forward recurrence; grid = (clusters,), num_ctas = C, 8 warps + 1."""
    wbuf, a_ring, ready, w_empty, a_empty, res_ready = pipeline_buffers(w0_desc, h_desc, C, S, RES_BLOCKS, STREAM)
    gl.warp_specialize([
        (forward_consumer, (w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, p_proj, p_h, p_c,
                            c_mod, p_act, p_m, p_len, p_ws, p_tickets, p_sync, p_err, p_table, p_counts, T, B, H,
                            n_clusters, n_ctas, tile_base1, timeout_ns, C, BB, S, SAVE, HAS_LEN, ROWS, RES_BLOCKS,
                            STREAM, max_items)),
        (forward_producer, (w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, h_desc, m_desc,
                            p_sync, p_err, p_table, p_counts, T, B, H, n_clusters, n_ctas, timeout_ns, C, S, ROWS,
                            RES_BLOCKS, STREAM, max_items)),
    ], [1], [PRODUCER_REGS])
