"""The persistent backward kernel (Gluon, sm_90a): every step of the reverse recurrence in one launch.

Legend as in :mod:`.gluon_common`; steps are walked t = T-1 .. 0, step s = T-1-t, phase instance
n = 2 s + p, then one tail instance n = 2T. ROWS, RES_BLOCKS and STREAM as in :mod:`.gluon_forward`.

    phase 0 "dh":  dh_t = dhm_{t+1} Wmh (K = H)   epilogue the cell derivatives -> dz_t, dc_{t-1}
    phase 1 "dm":  dm = dz_t Wh (K = 4H)          epilogue dxm = dm * hm, dhm_t = dm * xm
    tail    "dh":  dhm_0 Wmh                      epilogue the gradient of h0

Buffers the host lays out (:mod:`.launch`): ``ghm`` [T+1, B, H] with ghm[t] = dhm_t and ghm[T] = 0
(at t = T-1 nothing comes from the future: the product of zeros keeps one code path), ``grad_proj``
[T, B, 5H], ``dh`` and ``dc`` [B, H] float32 (the carried gradients; dh ends as the gradient of h0).
The weights are read transposed (W_view = W^T): their tiles are [BK, C*256] boxes, rows contiguous.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gluon_common import (
    EPI_B, EPI_M, PRODUCER_REGS, W_MNMAJOR, item, load_resident, mma_rows, phase_blocks, pipeline_buffers,
    produce_phase, wait_grid, wait_resident,
)
from .gluon_finish import chunk_index, contribute, finish_chunks, finish_phase, gather, store_partial, take_over
from .gluon_forward import _tanh


@gluon.jit
def _cell_backward(b_dh, o_n, o_bt, o_state, k_nb, b_active, b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc, H, p_dc,
                   p_dproj, HAS_LEN: gl.constexpr):
    """From dh_t, the saved gates and cells and the carried dc: dz_t (into dproj's first 4H
    columns) and dc_{t-1} (into dc)."""
    b_tanh_c = _tanh(b_c)
    b_dc_from_h = b_dh * b_o * (1.0 - b_tanh_c * b_tanh_c)
    if HAS_LEN:
        b_dc_from_h = gl.where(b_active, b_dc_from_h, 0.0)
    b_dc += b_dc_from_h
    b_dzi = b_dc * b_u * b_i * (1.0 - b_i)
    b_dzf = b_dc * b_c_prev * b_f * (1.0 - b_f)
    b_dzo = b_dh * b_tanh_c * b_o * (1.0 - b_o)
    b_dzu = b_dc * b_i * (1.0 - b_u * b_u)
    b_dc_prev = b_dc * b_f
    if HAS_LEN:
        b_dzi = gl.where(b_active, b_dzi, 0.0)
        b_dzf = gl.where(b_active, b_dzf, 0.0)
        b_dzo = gl.where(b_active, b_dzo, 0.0)
        b_dzu = gl.where(b_active, b_dzu, 0.0)
        b_dc_prev = gl.where(b_active, b_dc_prev, b_dc)
    gl.store(p_dc + o_state, b_dc_prev, mask=k_nb)
    dtype = p_dproj.dtype.element_ty
    p_dz = p_dproj + o_bt[None, :] * (5 * H) + o_n[:, None]
    gl.store(p_dz, b_dzi.to(dtype), mask=k_nb)
    gl.store(p_dz + H, b_dzf.to(dtype), mask=k_nb)
    gl.store(p_dz + 2 * H, b_dzo.to(dtype), mask=k_nb)
    gl.store(p_dz + 3 * H, b_dzu.to(dtype), mask=k_nb)


@gluon.jit
def _cell_operands(o_n, o_bt, o_state, k_nb, t, B, H, p_dout, p_act, p_cells, p_c0, p_dc, p_dcells,
                   HAS_DOUT: gl.constexpr, HAS_DCELLS: gl.constexpr):
    """What step t's cell derivatives read besides dh: dout_t, the gates, c_t, c_{t-1} and the
    carried dc (+ the cell-state gradient), loaded before the chunk's gather."""
    b_dout = gl.zeros(o_state.shape, gl.float32, o_state.type.layout)
    if HAS_DOUT:
        b_dout = gl.load(p_dout + o_bt[None, :] * H + o_n[:, None], mask=k_nb, other=0.0).to(gl.float32)
    p_a = p_act + o_bt[None, :] * (6 * H) + o_n[:, None]
    b_i = gl.load(p_a, mask=k_nb, other=0.0).to(gl.float32)
    b_f = gl.load(p_a + H, mask=k_nb, other=0.0).to(gl.float32)
    b_o = gl.load(p_a + 2 * H, mask=k_nb, other=0.0).to(gl.float32)
    b_u = gl.load(p_a + 3 * H, mask=k_nb, other=0.0).to(gl.float32)
    plane = B * H
    b_c = gl.load(p_cells + t.to(gl.int64) * plane + o_state, mask=k_nb, other=0.0)
    if t > 0:
        b_c_prev = gl.load(p_cells + (t - 1).to(gl.int64) * plane + o_state, mask=k_nb, other=0.0)
    else:
        b_c_prev = gl.load(p_c0 + o_state, mask=k_nb, other=0.0)
    b_dc = gl.load(p_dc + o_state, mask=k_nb, other=0.0, cache_modifier=".cg")
    if HAS_DCELLS:
        b_dc += gl.load(p_dcells + t.to(gl.int64) * plane + o_state, mask=k_nb, other=0.0)
    return b_dout, b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc


@gluon.jit
def epilogue_dh(p_ws, slot0, parts, group, t, B, H, p_dout, p_dh, p_dc, p_dcells, p_act, p_cells, p_c0, p_dproj,
                p_len, c_lo, c_hi, DO_CELL: gl.constexpr, HAS_DOUT: gl.constexpr, HAS_DCELLS: gl.constexpr,
                HAS_LEN: gl.constexpr, C: gl.constexpr, ROWS: gl.constexpr):
    """dh_t for chunks [c_lo, c_hi) of the CTA's ROWS units, then (DO_CELL) step t's cell
    derivatives; the tail (t = -1) leaves the gradient of h0 in dh."""
    n_b = gl.cdiv(B, EPI_B)
    for c in range(c_lo, c_hi):
        o_n, rank, o_u, o_b = chunk_index(group, (c // n_b) * EPI_M, (c % n_b) * EPI_B, ROWS, C, EPI_M)
        k_nb = (o_n < H)[:, None] & (o_b < B)[None, :]
        o_state = o_b[None, :] * H + o_n[:, None]
        o_bt = (t * B + o_b).to(gl.int64)
        # The operands before the parts: their HBM latency overlaps the gather's L2 round trips.
        if HAS_LEN:
            b_len = gl.load(p_len + o_b, mask=o_b < B, other=0)[None, :]
            b_dh_next = gl.load(p_dh + o_state, mask=k_nb, other=0.0, cache_modifier=".cg")
        if DO_CELL:
            b_dout, b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc = _cell_operands(
                o_n, o_bt, o_state, k_nb, t, B, H, p_dout, p_act, p_cells, p_c0, p_dc, p_dcells, HAS_DOUT,
                HAS_DCELLS)
        b_dh = gather(p_ws, slot0, parts, rank * ROWS + o_u, o_b, k_nb, B, C, ROWS, EPI_M)
        if HAS_LEN:
            b_active = t < b_len
            # A row that was padding at t+1 passed h_t through: its gradient passes straight back.
            b_dh += gl.where(t + 1 < b_len, 0.0, b_dh_next)
        else:
            b_active = k_nb
        if DO_CELL:
            b_dh += b_dout
            if HAS_LEN:
                gl.store(p_dh + o_state, b_dh, mask=k_nb)
            _cell_backward(b_dh, o_n, o_bt, o_state, k_nb, b_active, b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc, H,
                           p_dc, p_dproj, HAS_LEN)
        else:
            gl.store(p_dh + o_state, b_dh, mask=k_nb)


@gluon.jit
def epilogue_dm(p_ws, slot0, parts, group, t, B, H, p_act, p_dproj, p_ghm, c_lo, c_hi, C: gl.constexpr,
                ROWS: gl.constexpr):
    """dxm = dm * hm into dproj's last H columns, dhm_t = dm * xm into ghm[t], for chunks
    [c_lo, c_hi) of the CTA's ROWS units."""
    n_b = gl.cdiv(B, EPI_B)
    for c in range(c_lo, c_hi):
        o_n, rank, o_u, o_b = chunk_index(group, (c // n_b) * EPI_M, (c % n_b) * EPI_B, ROWS, C, EPI_M)
        k_nb = (o_n < H)[:, None] & (o_b < B)[None, :]
        o_bt = (t * B + o_b).to(gl.int64)
        p_a = p_act + o_bt[None, :] * (6 * H) + o_n[:, None]
        b_xm = gl.load(p_a + 4 * H, mask=k_nb, other=0.0).to(gl.float32)
        b_hm = gl.load(p_a + 5 * H, mask=k_nb, other=0.0).to(gl.float32)
        b_dm = gather(p_ws, slot0, parts, rank * ROWS + o_u, o_b, k_nb, B, C, ROWS, EPI_M)
        gl.store(p_dproj + o_bt[None, :] * (5 * H) + 4 * H + o_n[:, None],
                 (b_dm * b_hm).to(p_dproj.dtype.element_ty), mask=k_nb)
        gl.store(p_ghm + o_bt[None, :] * H + o_n[:, None], (b_dm * b_xm).to(p_ghm.dtype.element_ty), mask=k_nb)


@gluon.jit
def _dh_phase(w0_desc, wbuf, a_ring, ready, w_empty, a_empty, it, n, t, cluster, p_table, p_counts, p_ws, p_tickets,
              p_sync, p_err, p_dout, p_dh, p_dc, p_dcells, p_act, p_cells, p_c0, p_dproj, p_len, B, H, n_clusters,
              n_ctas, timeout_ns, C: gl.constexpr, BB: gl.constexpr, S: gl.constexpr, DO_CELL: gl.constexpr,
              HAS_DOUT: gl.constexpr, HAS_DCELLS: gl.constexpr, HAS_LEN: gl.constexpr, ROWS: gl.constexpr,
              RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr, max_items):
    wait_grid(p_sync, n - 1, n_ctas, p_err, timeout_ns, C)
    count = gl.load(p_counts + cluster)
    r = 0
    for i in range(count):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 0, cluster, i, n_clusters, max_items)
        acc = mma_rows(w0_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, kb_hi - kb_lo, C, BB, S, ROWS, W_MNMAJOR,
                       RES_BLOCKS, STREAM)
        store_partial(acc, p_ws, slot0 + part, 0, B, C, BB, ROWS)
        it += kb_hi - kb_lo
        r += kb_hi - kb_lo
        contribute(p_tickets, 0, g, parts, C)
    for i in range(count):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 0, cluster, i, n_clusters, max_items)
        take_over(p_tickets, 0, g, parts, n, p_err, timeout_ns, C)
        c_lo, c_hi = finish_chunks(part, parts, (ROWS // EPI_M) * gl.cdiv(B, EPI_B))
        epilogue_dh(p_ws, slot0, parts, g, t, B, H, p_dout, p_dh, p_dc, p_dcells, p_act, p_cells, p_c0, p_dproj,
                    p_len, c_lo, c_hi, DO_CELL, HAS_DOUT, HAS_DCELLS, HAS_LEN, C, ROWS)
    finish_phase(p_sync, n, C)
    return it


@gluon.jit
def _dm_phase(w1_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r1, n, t, cluster, p_table, p_counts, p_ws,
              p_tickets, p_sync, p_err, p_act, p_dproj, p_ghm, B, H, n_clusters, n_ctas, tile_base1, timeout_ns,
              C: gl.constexpr, BB: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr,
              STREAM: gl.constexpr, max_items):
    wait_grid(p_sync, n - 1, n_ctas, p_err, timeout_ns, C)
    count = gl.load(p_counts + n_clusters + cluster)
    r = r1
    for i in range(count):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 1, cluster, i, n_clusters, max_items)
        acc = mma_rows(w1_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r, kb_hi - kb_lo, C, BB, S, ROWS, W_MNMAJOR,
                       RES_BLOCKS, STREAM)
        store_partial(acc, p_ws, slot0 + part, 0, B, C, BB, ROWS)
        it += kb_hi - kb_lo
        r += kb_hi - kb_lo
        contribute(p_tickets, tile_base1, g, parts, C)
    for i in range(count):
        g, kb_lo, kb_hi, part, parts, slot0 = item(p_table, 1, cluster, i, n_clusters, max_items)
        take_over(p_tickets, tile_base1, g, parts, n, p_err, timeout_ns, C)
        c_lo, c_hi = finish_chunks(part, parts, (ROWS // EPI_M) * gl.cdiv(B, EPI_B))
        epilogue_dm(p_ws, slot0, parts, g, t, B, H, p_act, p_dproj, p_ghm, c_lo, c_hi, C, ROWS)
    finish_phase(p_sync, n, C)
    return it


@gluon.jit
def backward_consumer(w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, p_dout, p_dh, p_dc, p_dcells,
                      p_act, p_cells, p_c0, p_dproj, p_ghm, p_len, p_ws, p_tickets, p_sync, p_err, p_table, p_counts, T,
                      B, H, n_clusters, n_ctas, tile_base1, timeout_ns, C: gl.constexpr, BB: gl.constexpr,
                      S: gl.constexpr, HAS_DOUT: gl.constexpr, HAS_DCELLS: gl.constexpr, HAS_LEN: gl.constexpr,
                      ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr, max_items):
    cluster = gl.program_id(0)
    if RES_BLOCKS > 0:
        wait_resident(res_ready, p_table, p_counts, cluster, n_clusters, RES_BLOCKS, max_items)
    r1 = phase_blocks(p_table, p_counts, 0, cluster, n_clusters, max_items)
    it = 0
    for s in range(T):
        t = T - 1 - s
        it = _dh_phase(w0_desc, wbuf, a_ring, ready, w_empty, a_empty, it, 2 * s, t, cluster, p_table, p_counts, p_ws,
                       p_tickets, p_sync, p_err, p_dout, p_dh, p_dc, p_dcells, p_act, p_cells, p_c0, p_dproj, p_len, B,
                       H, n_clusters, n_ctas, timeout_ns, C, BB, S, True, HAS_DOUT, HAS_DCELLS, HAS_LEN, ROWS,
                       RES_BLOCKS, STREAM, max_items)
        it = _dm_phase(w1_desc, wbuf, a_ring, ready, w_empty, a_empty, it, r1, 2 * s + 1, t, cluster, p_table,
                       p_counts, p_ws, p_tickets, p_sync, p_err, p_act, p_dproj, p_ghm, B, H, n_clusters, n_ctas,
                       tile_base1, timeout_ns, C, BB, S, ROWS, RES_BLOCKS, STREAM, max_items)
    # The tail: dhm_0 Wmh, the gradient of h0 (t = -1 for the padding rule).
    _dh_phase(w0_desc, wbuf, a_ring, ready, w_empty, a_empty, it, 2 * T, -1, cluster, p_table, p_counts, p_ws,
              p_tickets, p_sync, p_err, p_dout, p_dh, p_dc, p_dcells, p_act, p_cells, p_c0, p_dproj, p_len, B, H,
              n_clusters, n_ctas, timeout_ns, C, BB, S, False, HAS_DOUT, HAS_DCELLS, HAS_LEN, ROWS, RES_BLOCKS, STREAM,
              max_items)


@gluon.jit
def backward_producer(w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, dhm_desc, dz_desc, p_sync,
                      p_err, p_table, p_counts, T, B, H, n_clusters, n_ctas, timeout_ns, C: gl.constexpr,
                      S: gl.constexpr, ROWS: gl.constexpr, RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr, max_items):
    cluster = gl.program_id(0)
    if RES_BLOCKS > 0:
        load_resident(w0_desc, w1_desc, wbuf, res_ready, p_table, p_counts, cluster, n_clusters, H, C, ROWS, W_MNMAJOR,
                      W_MNMAJOR, RES_BLOCKS, max_items)
    r1 = phase_blocks(p_table, p_counts, 0, cluster, n_clusters, max_items)
    it = 0
    for s in range(T):
        t = T - 1 - s
        it = produce_phase(w0_desc, dhm_desc, (t + 1) * B, wbuf, a_ring, ready, w_empty, a_empty, p_table, p_counts,
                           0, cluster, n_clusters, it, 0, p_sync, 2 * s, n_ctas, p_err, timeout_ns, H, C, S, ROWS,
                           W_MNMAJOR, RES_BLOCKS, STREAM, max_items)
        it = produce_phase(w1_desc, dz_desc, t * B, wbuf, a_ring, ready, w_empty, a_empty, p_table, p_counts, 1,
                           cluster, n_clusters, it, r1, p_sync, 2 * s + 1, n_ctas, p_err, timeout_ns, H, C, S, ROWS,
                           W_MNMAJOR, RES_BLOCKS, STREAM, max_items)
    produce_phase(w0_desc, dhm_desc, 0, wbuf, a_ring, ready, w_empty, a_empty, p_table, p_counts, 0, cluster,
                  n_clusters, it, 0, p_sync, 2 * T, n_ctas, p_err, timeout_ns, H, C, S, ROWS, W_MNMAJOR, RES_BLOCKS,
                  STREAM, max_items)


@gluon.jit(do_not_specialize=["T", "B", "H", "n_clusters", "n_ctas", "tile_base1", "max_items"])
def backward_kernel(w0_desc, w1_desc, dhm_desc, dz_desc, p_dout, p_dh, p_dc, p_dcells, p_act, p_cells, p_c0, p_dproj,
                    p_ghm, p_len, p_ws, p_tickets, p_sync, p_err, p_table, p_counts, T, B, H, n_clusters, n_ctas,
                    tile_base1, max_items, timeout_ns, C: gl.constexpr, BB: gl.constexpr, S: gl.constexpr,
                    HAS_DOUT: gl.constexpr, HAS_DCELLS: gl.constexpr, HAS_LEN: gl.constexpr, ROWS: gl.constexpr,
                    RES_BLOCKS: gl.constexpr, STREAM: gl.constexpr):
    """One launch of the backward recurrence; grid = (clusters,), num_ctas = C, 8 warps + 1."""
    wbuf, a_ring, ready, w_empty, a_empty, res_ready = pipeline_buffers(w0_desc, dhm_desc, C, S, RES_BLOCKS, STREAM)
    gl.warp_specialize([
        (backward_consumer, (w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, p_dout, p_dh, p_dc,
                             p_dcells, p_act, p_cells, p_c0, p_dproj, p_ghm, p_len, p_ws, p_tickets, p_sync, p_err,
                             p_table, p_counts, T, B, H, n_clusters, n_ctas, tile_base1, timeout_ns, C, BB, S,
                             HAS_DOUT, HAS_DCELLS, HAS_LEN, ROWS, RES_BLOCKS, STREAM, max_items)),
        (backward_producer, (w0_desc, w1_desc, wbuf, a_ring, ready, w_empty, a_empty, res_ready, dhm_desc, dz_desc,
                             p_sync, p_err, p_table, p_counts, T, B, H, n_clusters, n_ctas, timeout_ns, C, S, ROWS,
                             RES_BLOCKS, STREAM, max_items)),
    ], [1], [PRODUCER_REGS])
