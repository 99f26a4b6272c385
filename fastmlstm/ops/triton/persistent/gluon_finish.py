"""The finish of the persistent Gluon kernels (sm_90a): partial tiles into the workspace, the
tickets of split tiles, and the epilogue chunks' fixed-order gather (``schedule``'s module
docstring: a phase's two passes, every part finishing a slice of its tile).

Legend as in :mod:`.gluon_common`. A workspace block is [B, C*ROWS] float32, units contiguous:
row k*ROWS + r holds rank k's accumulator row r, except for the 256-row gate product, whose four
accumulators go to rows g*C*64 + k*64 + u. EM x EB is an epilogue chunk per CTA: 64 units x 32
batch rows, or 16 x 128 for a 64-row tile's gate units (8 values per thread either way).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gluon_common import GATE_GATHER, GATHER, arrive_each, epi_cols, epi_layout, proxy_fence, ranks, wait_count


@gluon.jit
def store_partial(acc, p_ws, block, row0, B, C: gl.constexpr, BB: gl.constexpr, ROWS: gl.constexpr):
    """The cluster's float32 partials into workspace block ``block``: accumulator row r goes to
    block row row0 + r (rank k's rows of a tile at k*ROWS; of a 256-row tile's gate, at
    gate*C*64 + k*64)."""
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
def gather(p_ws, block0, parts, o_row, o_b, k_nb, B, C: gl.constexpr, ROWS: gl.constexpr, EM: gl.constexpr):
    """Sum of a chunk's parts (block rows o_row, batch rows o_b) in part order, GATHER parts
    loaded per round (all in flight together): bitwise the same whoever stored first."""
    b_sum = gl.zeros([C * EM, epi_cols(EM)], gl.float32, epi_layout(C, EM))
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
def gather_gates(p_ws, block0, parts, o_row, gate_step, o_b, k_nb, B, C: gl.constexpr, ROWS: gl.constexpr,
                 EM: gl.constexpr):
    """The four gates' sums of a chunk (gate g's rows at g * gate_step + o_row), each in part
    order; a round loads GATE_GATHER parts of every gate (one basic block: all in flight)."""
    layout: gl.constexpr = epi_layout(C, EM)
    b_i = gl.zeros([C * EM, epi_cols(EM)], gl.float32, layout)
    b_f = gl.zeros([C * EM, epi_cols(EM)], gl.float32, layout)
    b_o = gl.zeros([C * EM, epi_cols(EM)], gl.float32, layout)
    b_u = gl.zeros([C * EM, epi_cols(EM)], gl.float32, layout)
    o_ws = o_b[None, :] * (C * ROWS) + o_row[:, None]
    stride = B * (C * ROWS)
    for p0 in range(0, parts, GATE_GATHER):
        b_i = _gate_round(b_i, p_ws, block0 + p0, stride, o_ws, k_nb, p0, parts)
        b_f = _gate_round(b_f, p_ws, block0 + p0, stride, o_ws + gate_step, k_nb, p0, parts)
        b_o = _gate_round(b_o, p_ws, block0 + p0, stride, o_ws + 2 * gate_step, k_nb, p0, parts)
        b_u = _gate_round(b_u, p_ws, block0 + p0, stride, o_ws + 3 * gate_step, k_nb, p0, parts)
    return b_i, b_f, b_o, b_u


@gluon.jit
def chunk_index(group, u0, b0, UNITS: gl.constexpr, C: gl.constexpr, EM: gl.constexpr):
    """An epilogue chunk: units [u0, u0 + EM) of each CTA's tile of UNITS units (tile group * C +
    rank) and batch rows [b0, b0 + EB). Returns (unit, rank, unit offset in the tile, batch row)."""
    layout: gl.constexpr = epi_layout(C, EM)
    o_r = gl.arange(0, C * EM, gl.SliceLayout(1, layout))
    o_b = b0 + gl.arange(0, epi_cols(EM), gl.SliceLayout(0, layout))
    rank = o_r // EM
    o_u = u0 + o_r % EM
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
