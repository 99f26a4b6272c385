"""Fused Triton kernels for one time step of the multiplicative LSTM, forward and backward.

Legend
    B  batch rows             H  hidden units            G = 4 gates, order i, f, o, u
    BB rows per program        BN hidden units per program   BK reduction block
    S  K-splits (programs that share one output tile, each reducing a slice of K)
    p_ pointers, b_ blocks (register tiles), o_ offsets, k_ masks, i_ program ids

Layouts (all row-major and contiguous; the driver guarantees it):
    proj_t  [B, 5H]  x Wx + b (gates) then xm = x Wmx     act_t [B, 6H]  gates, xm, hm (saved)
    w_hh    [4H, H]  torch [out, in] layout, applied to m w_hm  [H, H]    applied to h
    h, m, dhm [B, H] activation dtype                     c, dh, dc [B, H] float32
    ws      [S, B, N] float32 partial sums (N = H, or 4H for the gate kernel); tickets [tiles] int32

A forward step is two launches because m_t must be complete before any gate can use it:
    fwd_m_kernel: hm = h_{t-1} Wmh^T              epilogue m = xm * hm
    fwd_z_kernel: z = xg + m Wh^T (4 gate tiles)  epilogue gates, c_t, h_t (and the padding mask)
A backward step is the mirror image:
    bwd_h_kernel: dh_t = dhm_{t+1} Wmh + dout_t    epilogue the cell derivatives -> dz_t, dc_{t-1}
    bwd_m_kernel: dm = dz_t Wh                     epilogue dxm = dm * hm, dhm = dm * xm

Grid: (S, hidden tiles, batch tiles). A program owns BN hidden units of BB rows (of all four gates in
the gate kernel) and reduces one slice of K. With S = 1 it runs the epilogue itself. With S > 1
(split-K) every program stores its float32 partial tile to ws and takes a ticket (an atomic counter
per output tile); the program that draws the last ticket sums the S partials in split order and
runs the epilogue. Summing in a fixed order keeps results bitwise deterministic whichever program
finishes last, and no program ever waits for another, so the scheme also runs under Triton's
interpreter, which executes programs one after another. The last program resets its ticket to 0
for the next launch.

Why split-K: at the sizes that matter every step streams 5 H^2 weights from HBM for a handful of
rows, so the kernels are bandwidth-bound. Splitting K gives enough programs to fill the GPU while
keeping each output tile wide, which bounds how often the activation operand [B, K] is re-read
through L2 (once per hidden tile); bench/kernels/NOTES.md has the arithmetic.

USE_PDL (Hopper only): the kernels are launched with programmatic dependent launch. Each program
calls gdc_wait before its first global memory access, so it observes everything the previous launch
wrote, and gdc_launch_dependents right after, so the next launch is scheduled while this one runs.
"""

import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch); absent from older Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # the USE_PDL branches are never compiled then
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False

# Integer arguments that must not be specialized: Triton would otherwise compile separate variants
# for values equal to 1 or divisible by 16, i.e. specialize on the step index t.
_RUNTIME_INTS = ["t", "n_split"]


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for very negative x, giving 1 / inf = 0: no NaN either way.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1 saturates cleanly to +-1 (tl has no tanh that also runs in the interpreter).
    return 2.0 * _sigmoid(2.0 * x) - 1.0


# INTERPRET_BF16 is set only when Triton's CPU interpreter runs bfloat16 kernels, to work around two
# interpreter defects (triton 3.x): tl.dot on bf16 operands returns garbage, and float32 -> bf16
# casts truncate instead of rounding to nearest even. On a GPU it is always off.


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    if INTERPRET_BF16:
        # bf16 values are exact in float32, so this is the product the GPU computes.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """float32 -> activation dtype, rounding to nearest even."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _tile(B, H, BB: tl.constexpr, BN: tl.constexpr):
    """The rows and hidden units this program owns (grid: splits x hidden tiles x batch tiles),
    their masks, and the index of the output tile (for its ticket)."""
    i_n = tl.program_id(1)
    i_b = tl.program_id(2)
    o_b = i_b * BB + tl.arange(0, BB)
    o_n = i_n * BN + tl.arange(0, BN)
    return o_b, o_n, o_b < B, o_n < H, i_b * tl.num_programs(1) + i_n


@triton.jit
def _k_blocks(K, n_split, BK: tl.constexpr):
    """[kb_lo, kb_hi): the BK-blocks of K this program's split reduces, split sizes differing by at
    most one block (a split can be empty when K has fewer blocks than there are splits).

    The loops run over block indices and mask against K alone: k0 = kb * BK is then known to be a
    multiple of BK and the mask constant over aligned groups, which Triton's pipeliner needs to
    turn the loads into asynchronous copies (with a runtime k_lo it would not).
    """
    i_s = tl.program_id(0)
    blocks = tl.cdiv(K, BK)
    return (i_s * blocks) // n_split, ((i_s + 1) * blocks) // n_split


@triton.jit
def _split_base(p_ws, slab):
    """This split's slab of the workspace (the offset is formed in 64 bits)."""
    return p_ws + (tl.full([], 0, tl.int64) + tl.program_id(0)) * slab


@triton.jit
def _publish(acc, p_ws, o_ws, k_ws, slab, p_ticket, tile, n_split):
    """Store this split's partial tile and draw a ticket; True for the program that drew the last."""
    tl.store(_split_base(p_ws, slab) + o_ws, acc, mask=k_ws)
    # Every warp's partial stores come before the ticket (bar.sync), and the acq_rel atomic makes
    # them visible at GPU scope to whoever draws the last ticket (release is cumulative).
    tl.debug_barrier()
    ticket = tl.atomic_add(p_ticket + tile, 1, sem="acq_rel", scope="gpu")
    return ticket == n_split - 1


@triton.jit
def _gather(p_ws, o_ws, k_ws, slab, n_split, BB: tl.constexpr, BN: tl.constexpr, GATHER: tl.constexpr):
    """Sum of the S partial tiles in split order (so the result is independent of arrival order).

    Each round issues the loads of GATHER partials (1, 2 or 4) before adding them, so their L2
    latencies overlap instead of following one another; a split past S loads -0.0, the additive
    identity, so the sum is bitwise the same for every GATHER. .cg reads bypass L1: the partials
    were written by other SMs.
    """
    acc = tl.zeros([BB, BN], dtype=tl.float32)
    p_s = p_ws + o_ws
    for s0 in range(0, n_split, GATHER):
        b_p0 = tl.load(p_s, mask=k_ws, other=0.0, cache_modifier=".cg")
        if GATHER >= 2:
            b_left = tl.zeros([BB, BN], dtype=tl.int32) + (n_split - s0)  # splits left, this round's included
            b_p1 = tl.load(p_s + slab, mask=k_ws & (b_left > 1), other=-0.0, cache_modifier=".cg")
        if GATHER >= 4:
            b_p2 = tl.load(p_s + 2 * slab, mask=k_ws & (b_left > 2), other=-0.0, cache_modifier=".cg")
            b_p3 = tl.load(p_s + 3 * slab, mask=k_ws & (b_left > 3), other=-0.0, cache_modifier=".cg")
        acc += b_p0
        if GATHER >= 2:
            acc += b_p1
        if GATHER >= 4:
            acc += b_p2
            acc += b_p3
        p_s += GATHER * slab  # 64-bit pointer arithmetic: S * slab may exceed 2^31 elements
    return acc


@triton.jit
def _cell_inputs(p_proj, p_c_prev, p_h_prev, p_len, o_b, o_n, k_b, k_bn, t, H, HAS_LEN: tl.constexpr):
    """The forward epilogue's operands: the four gate inputs of proj_t (activation dtype), c_{t-1}
    and, with HAS_LEN, h_{t-1} and which rows are still active (else c_{t-1} and True stand in)."""
    p_x = p_proj + o_b[:, None] * (5 * H) + o_n[None, :]
    b_xi = tl.load(p_x, mask=k_bn, other=0.0)
    b_xf = tl.load(p_x + H, mask=k_bn, other=0.0)
    b_xo = tl.load(p_x + 2 * H, mask=k_bn, other=0.0)
    b_xu = tl.load(p_x + 3 * H, mask=k_bn, other=0.0)
    o_state = o_b[:, None] * H + o_n[None, :]
    b_c_prev = tl.load(p_c_prev + o_state, mask=k_bn, other=0.0)
    if HAS_LEN:
        b_active = (t < tl.load(p_len + o_b, mask=k_b, other=0))[:, None]
        b_h_prev = tl.load(p_h_prev + o_state, mask=k_bn, other=0.0)
    else:
        b_active = k_bn
        b_h_prev = b_c_prev
    return b_xi, b_xf, b_xo, b_xu, b_c_prev, b_h_prev, b_active


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def fwd_m_kernel(
    p_h, p_w_hm, p_proj, p_m, p_act, B, H, p_ws, p_ticket, n_split,
    SAVE: tl.constexpr, SPLIT: tl.constexpr, GATHER: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, USE_PDL: tl.constexpr,
):
    """hm = h_{t-1} Wmh^T over K = H, then m = xm * hm (into p_m) and, with SAVE, xm and hm into act.

    p_h [B, H] is h_{t-1} in the activation dtype; p_proj is proj_t (xm in its last H columns).
    SPLIT is false when the launch has one split (n_split == 1): no partials, no ticket.
    """
    _prologue(USE_PDL)
    o_b, o_n, k_b, k_n, tile = _tile(B, H, BB, BN)
    kb_lo, kb_hi = _k_blocks(H, n_split, BK)
    k_bn = k_b[:, None] & k_n[None, :]
    o_bn = o_b[:, None] * H + o_n[None, :]
    p_xm = p_proj + o_b[:, None] * (5 * H) + 4 * H + o_n[None, :]
    if not SPLIT:
        # The epilogue's operand, loaded before the K loop: its latency hides behind the loop.
        b_xm = tl.load(p_xm, mask=k_bn, other=0.0)

    b_hm = tl.zeros([BB, BN], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        o_k = kb * BK + tl.arange(0, BK)
        k_k = o_k < H
        b_h = tl.load(p_h + o_b[:, None] * H + o_k[None, :], mask=k_b[:, None] & k_k[None, :], other=0.0)
        # Wmh^T tile: element (k, n) is w_hm[n, k]; each of its BN rows reads BK contiguous values.
        b_w = tl.load(p_w_hm + o_n[None, :] * H + o_k[:, None], mask=k_k[:, None] & k_n[None, :], other=0.0)
        b_hm = _mma(b_h, b_w, b_hm, PRECISION, INTERPRET_BF16)

    if SPLIT:
        last = _publish(b_hm, p_ws, o_bn, k_bn, B * H, p_ticket, tile, n_split)
    else:
        last = True
    if last:
        if SPLIT:
            # Only the last program needs xm: issued with the partials' loads, so the two overlap.
            b_xm = tl.load(p_xm, mask=k_bn, other=0.0)
            b_hm = _gather(p_ws, o_bn, k_bn, B * H, n_split, BB, BN, GATHER)
            tl.store(p_ticket + tile, 0)
        b_m = b_hm * b_xm.to(tl.float32)
        tl.store(p_m + o_bn, _cast(b_m, p_m.dtype.element_ty, INTERPRET_BF16), mask=k_bn)
        if SAVE:
            p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
            tl.store(p_a + 4 * H, b_xm, mask=k_bn)
            tl.store(p_a + 5 * H, _cast(b_hm, p_act.dtype.element_ty, INTERPRET_BF16), mask=k_bn)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def fwd_z_kernel(
    p_m, p_w_hh, p_proj, p_h_prev, p_c_prev, p_h, p_c, p_act, p_len, t, B, H, p_ws, p_ticket, n_split,
    SAVE: tl.constexpr, HAS_LEN: tl.constexpr, SPLIT: tl.constexpr, GATHER: tl.constexpr, BB: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, USE_PDL: tl.constexpr,
):
    """z = xg + m Wh^T over K = H for BN units of all four gates, then the cell update of step t.

    Writes c_t (float32, p_c; may alias p_c_prev: each element is read, then written, by the one
    program that runs this tile's epilogue), h_t (p_h) and, with SAVE, the gates i, f, o, u into act.
    HAS_LEN: rows with t >= lengths[b] carry h_{t-1} and c_{t-1} through unchanged.
    """
    _prologue(USE_PDL)
    o_b, o_n, k_b, k_n, tile = _tile(B, H, BB, BN)
    kb_lo, kb_hi = _k_blocks(H, n_split, BK)
    # Offset between gate blocks of w_hh; the driver keeps 4 H^2 below 2^31.
    gate_stride = H * H
    k_bn = k_b[:, None] & k_n[None, :]
    if not SPLIT:
        # The epilogue's operands, loaded before the K loop: their latency hides behind the loop.
        b_xi, b_xf, b_xo, b_xu, b_c_prev, b_h_prev, b_active = _cell_inputs(
            p_proj, p_c_prev, p_h_prev, p_len, o_b, o_n, k_b, k_bn, t, H, HAS_LEN)

    b_zi = tl.zeros([BB, BN], dtype=tl.float32)
    b_zf = tl.zeros([BB, BN], dtype=tl.float32)
    b_zo = tl.zeros([BB, BN], dtype=tl.float32)
    b_zu = tl.zeros([BB, BN], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        o_k = kb * BK + tl.arange(0, BK)
        k_k = o_k < H
        b_m = tl.load(p_m + o_b[:, None] * H + o_k[None, :], mask=k_b[:, None] & k_k[None, :], other=0.0)
        p_w = p_w_hh + o_n[None, :] * H + o_k[:, None]
        k_w = k_k[:, None] & k_n[None, :]
        b_zi = _mma(b_m, tl.load(p_w, mask=k_w, other=0.0), b_zi,
                    PRECISION, INTERPRET_BF16)
        b_zf = _mma(b_m, tl.load(p_w + gate_stride, mask=k_w, other=0.0), b_zf,
                    PRECISION, INTERPRET_BF16)
        b_zo = _mma(b_m, tl.load(p_w + 2 * gate_stride, mask=k_w, other=0.0), b_zo,
                    PRECISION, INTERPRET_BF16)
        b_zu = _mma(b_m, tl.load(p_w + 3 * gate_stride, mask=k_w, other=0.0), b_zu,
                    PRECISION, INTERPRET_BF16)

    o_z = o_b[:, None] * (4 * H) + o_n[None, :]
    if SPLIT:
        # One slab of [B, 4H] per split; the four gate tiles of this program sit H columns apart.
        slab = B * 4 * H
        p_own = _split_base(p_ws, slab) + o_z
        tl.store(p_own, b_zi, mask=k_bn)
        tl.store(p_own + H, b_zf, mask=k_bn)
        tl.store(p_own + 2 * H, b_zo, mask=k_bn)
        last = _publish(b_zu, p_ws, o_z + 3 * H, k_bn, slab, p_ticket, tile, n_split)
    else:
        last = True
    if last:
        if SPLIT:
            # Only the last program needs the operands: issued with the partials' loads.
            b_xi, b_xf, b_xo, b_xu, b_c_prev, b_h_prev, b_active = _cell_inputs(
                p_proj, p_c_prev, p_h_prev, p_len, o_b, o_n, k_b, k_bn, t, H, HAS_LEN)
            b_zi = _gather(p_ws, o_z, k_bn, slab, n_split, BB, BN, GATHER)
            b_zf = _gather(p_ws, o_z + H, k_bn, slab, n_split, BB, BN, GATHER)
            b_zo = _gather(p_ws, o_z + 2 * H, k_bn, slab, n_split, BB, BN, GATHER)
            b_zu = _gather(p_ws, o_z + 3 * H, k_bn, slab, n_split, BB, BN, GATHER)
            tl.store(p_ticket + tile, 0)
        b_i = _sigmoid(b_zi + b_xi.to(tl.float32))
        b_f = _sigmoid(b_zf + b_xf.to(tl.float32))
        b_o = _sigmoid(b_zo + b_xo.to(tl.float32))
        b_u = _tanh(b_zu + b_xu.to(tl.float32))

        o_state = o_b[:, None] * H + o_n[None, :]
        b_c = b_f * b_c_prev + b_i * b_u
        b_h = b_o * _tanh(b_c)
        if HAS_LEN:
            # A row past its length keeps its state: h and c are carried through unchanged.
            b_c = tl.where(b_active, b_c, b_c_prev)
            b_h = tl.where(b_active, b_h, b_h_prev.to(tl.float32))
        tl.store(p_c + o_state, b_c, mask=k_bn)
        tl.store(p_h + o_state, _cast(b_h, p_h.dtype.element_ty, INTERPRET_BF16), mask=k_bn)
        if SAVE:
            p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
            dtype = p_act.dtype.element_ty
            tl.store(p_a, _cast(b_i, dtype, INTERPRET_BF16), mask=k_bn)
            tl.store(p_a + H, _cast(b_f, dtype, INTERPRET_BF16), mask=k_bn)
            tl.store(p_a + 2 * H, _cast(b_o, dtype, INTERPRET_BF16), mask=k_bn)
            tl.store(p_a + 3 * H, _cast(b_u, dtype, INTERPRET_BF16), mask=k_bn)


@triton.jit
def _cell_operands(p_act, p_c, p_c_prev, p_dc, p_dcells, o_b, o_nc, o_state, k_bn, H, HAS_DCELLS: tl.constexpr):
    """The saved values the cell derivatives of one column chunk need: the gates i, f, o, u, c_t,
    c_{t-1} and the carried dc (plus the cell-state gradient with HAS_DCELLS), all as float32."""
    p_a = p_act + o_b[:, None] * (6 * H) + o_nc[None, :]
    b_i = tl.load(p_a, mask=k_bn, other=0.0).to(tl.float32)
    b_f = tl.load(p_a + H, mask=k_bn, other=0.0).to(tl.float32)
    b_o = tl.load(p_a + 2 * H, mask=k_bn, other=0.0).to(tl.float32)
    b_u = tl.load(p_a + 3 * H, mask=k_bn, other=0.0).to(tl.float32)
    b_c = tl.load(p_c + o_state, mask=k_bn, other=0.0)
    b_c_prev = tl.load(p_c_prev + o_state, mask=k_bn, other=0.0)
    b_dc = tl.load(p_dc + o_state, mask=k_bn, other=0.0)
    if HAS_DCELLS:
        b_dc += tl.load(p_dcells + o_state, mask=k_bn, other=0.0).to(tl.float32)
    return b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc


@triton.jit
def _cell_backward(b_dh, b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc, o_b, o_nc, o_state, k_bn, b_active, H, p_dc,
                   p_dproj, HAS_LEN: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """The cell derivatives of step t for one column chunk: from dh_t and the carried dc, the gate
    gradients dz_t (into dproj's first 4H columns) and dc_{t-1} (back into p_dc)."""
    b_tanh_c = _tanh(b_c)
    b_dc_from_h = b_dh * b_o * (1.0 - b_tanh_c * b_tanh_c)
    if HAS_LEN:
        b_dc_from_h = tl.where(b_active, b_dc_from_h, 0.0)
    b_dc += b_dc_from_h
    b_dzi = b_dc * b_u * b_i * (1.0 - b_i)
    b_dzf = b_dc * b_c_prev * b_f * (1.0 - b_f)
    b_dzo = b_dh * b_tanh_c * b_o * (1.0 - b_o)
    b_dzu = b_dc * b_i * (1.0 - b_u * b_u)
    b_dc_prev = b_dc * b_f
    if HAS_LEN:
        b_dzi = tl.where(b_active, b_dzi, 0.0)
        b_dzf = tl.where(b_active, b_dzf, 0.0)
        b_dzo = tl.where(b_active, b_dzo, 0.0)
        b_dzu = tl.where(b_active, b_dzu, 0.0)
        b_dc_prev = tl.where(b_active, b_dc_prev, b_dc)
    tl.store(p_dc + o_state, b_dc_prev, mask=k_bn)

    p_dz = p_dproj + o_b[:, None] * (5 * H) + o_nc[None, :]
    dtype = p_dproj.dtype.element_ty
    tl.store(p_dz, _cast(b_dzi, dtype, INTERPRET_BF16), mask=k_bn)
    tl.store(p_dz + H, _cast(b_dzf, dtype, INTERPRET_BF16), mask=k_bn)
    tl.store(p_dz + 2 * H, _cast(b_dzo, dtype, INTERPRET_BF16), mask=k_bn)
    tl.store(p_dz + 3 * H, _cast(b_dzu, dtype, INTERPRET_BF16), mask=k_bn)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def bwd_h_kernel(
    p_dhm_next, p_w_hm, p_dout, p_dh, p_dc, p_dcells, p_act, p_c, p_c_prev, p_dproj, p_len, t, B, H,
    p_ws, p_ticket, n_split,
    HAS_REC: tl.constexpr, DO_CELL: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DCELLS: tl.constexpr,
    HAS_LEN: tl.constexpr, SPLIT: tl.constexpr, GATHER: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, EPI_BN: tl.constexpr, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """dh_t = dhm_{t+1} Wmh (+ dout_t), then the cell derivatives of step t.

    HAS_REC is false at t = T-1 (nothing comes from the future; the driver launches one split);
    DO_CELL is false for the extra launch at t = -1 that only produces the gradient of h0 (left in
    p_dh). Wmh is read as [K, N] = w_hm[k, n]: each of a tile's BK rows reads BN contiguous values.

    The epilogue keeps about a dozen float32 tiles alive, too many registers for a whole [BB, BN]
    tile at BB = 128. SPLIT here means "through the workspace": the driver sets it for more than one
    split and also for big tiles (then, with one split, the ticket is trivially the last); the
    epilogue then runs over column chunks of EPI_BN read back from the workspace. Without SPLIT
    the product stays in registers and EPI_BN == BN.
    """
    _prologue(USE_PDL)
    o_b, o_n, k_b, k_n, tile = _tile(B, H, BB, BN)

    if HAS_REC:
        kb_lo, kb_hi = _k_blocks(H, n_split, BK)
        b_rec = tl.zeros([BB, BN], dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            o_k = kb * BK + tl.arange(0, BK)
            k_k = o_k < H
            b_g = tl.load(p_dhm_next + o_b[:, None] * H + o_k[None, :], mask=k_b[:, None] & k_k[None, :], other=0.0)
            b_w = tl.load(p_w_hm + o_k[:, None] * H + o_n[None, :], mask=k_k[:, None] & k_n[None, :], other=0.0)
            b_rec = _mma(b_g, b_w, b_rec, PRECISION, INTERPRET_BF16)
        if SPLIT:
            last = _publish(b_rec, p_ws, o_b[:, None] * H + o_n[None, :], k_b[:, None] & k_n[None, :], B * H,
                            p_ticket, tile, n_split)
        else:
            last = True
    else:
        last = True

    if last:
        if HAS_REC and SPLIT:
            tl.store(p_ticket + tile, 0)
        if HAS_LEN:
            b_len = tl.load(p_len + o_b, mask=k_b, other=0)
            b_active = (t < b_len)[:, None]
        else:
            b_active = k_b[:, None]
        # A loop, not unrolled: the epilogue is long, and up to 8 copies of it made compiles slow.
        for c in range(BN // EPI_BN):
            o_nc = tl.program_id(1) * BN + c * EPI_BN + tl.arange(0, EPI_BN)
            k_bn = k_b[:, None] & (o_nc < H)[None, :]
            o_state = o_b[:, None] * H + o_nc[None, :]
            if DO_CELL:
                # The saved operands first, so their loads overlap the partials' (or, without
                # split-K, each other's).
                b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc = _cell_operands(
                    p_act, p_c, p_c_prev, p_dc, p_dcells, o_b, o_nc, o_state, k_bn, H, HAS_DCELLS)
                if HAS_DOUT:
                    b_dout = tl.load(p_dout + o_state, mask=k_bn, other=0.0)
            if HAS_REC:
                if SPLIT:
                    b_dh = _gather(p_ws, o_state, k_bn, B * H, n_split, BB, EPI_BN, GATHER)
                else:
                    b_dh = b_rec
                if HAS_LEN:
                    # A row that was padding at t+1 passed h_t through, so its gradient passes straight
                    # back: p_dh holds the full gradient that reached h_{t+1}.
                    b_dh += tl.where((t + 1 < b_len)[:, None], 0.0, tl.load(p_dh + o_state, mask=k_bn, other=0.0))
            else:
                b_dh = tl.load(p_dh + o_state, mask=k_bn, other=0.0)

            if DO_CELL:
                if HAS_DOUT:
                    b_dh += b_dout.to(tl.float32)
                if HAS_LEN:
                    # Only the padding rule above reads dh_t back (at t - 1); without lengths the
                    # launch at t = -1 alone leaves the gradient of h0 in p_dh.
                    tl.store(p_dh + o_state, b_dh, mask=k_bn)
                _cell_backward(b_dh, b_i, b_f, b_o, b_u, b_c, b_c_prev, b_dc, o_b, o_nc, o_state, k_bn, b_active, H,
                               p_dc, p_dproj, HAS_LEN, INTERPRET_BF16)
            else:
                tl.store(p_dh + o_state, b_dh, mask=k_bn)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def bwd_m_kernel(
    p_dproj, p_w_hh, p_act, p_dhm, B, H, p_ws, p_ticket, n_split,
    SPLIT: tl.constexpr, GATHER: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, USE_PDL: tl.constexpr,
):
    """dm = dz_t Wh over K = 4H, then dxm = dm * hm (into dproj's last H columns) and dhm = dm * xm.

    dz_t is dproj's first 4H columns (written by bwd_h_kernel); Wh is read as [K, N] = w_hh[k, n].
    """
    _prologue(USE_PDL)
    o_b, o_n, k_b, k_n, tile = _tile(B, H, BB, BN)
    kb_lo, kb_hi = _k_blocks(4 * H, n_split, BK)
    k_bn = k_b[:, None] & k_n[None, :]
    o_state = o_b[:, None] * H + o_n[None, :]
    p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
    if not SPLIT:
        # The epilogue's operands, loaded before the K loop: their latency hides behind the loop.
        b_xm = tl.load(p_a + 4 * H, mask=k_bn, other=0.0)
        b_hm = tl.load(p_a + 5 * H, mask=k_bn, other=0.0)

    b_dm = tl.zeros([BB, BN], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        o_k = kb * BK + tl.arange(0, BK)
        k_k = o_k < 4 * H
        b_dz = tl.load(p_dproj + o_b[:, None] * (5 * H) + o_k[None, :], mask=k_b[:, None] & k_k[None, :], other=0.0)
        b_w = tl.load(p_w_hh + o_k[:, None] * H + o_n[None, :], mask=k_k[:, None] & k_n[None, :], other=0.0)
        b_dm = _mma(b_dz, b_w, b_dm, PRECISION, INTERPRET_BF16)

    if SPLIT:
        last = _publish(b_dm, p_ws, o_state, k_bn, B * H, p_ticket, tile, n_split)
    else:
        last = True
    if last:
        if SPLIT:
            # Only the last program needs xm and hm: issued with the partials' loads.
            b_xm = tl.load(p_a + 4 * H, mask=k_bn, other=0.0)
            b_hm = tl.load(p_a + 5 * H, mask=k_bn, other=0.0)
            b_dm = _gather(p_ws, o_state, k_bn, B * H, n_split, BB, BN, GATHER)
            tl.store(p_ticket + tile, 0)
        tl.store(p_dproj + o_b[:, None] * (5 * H) + 4 * H + o_n[None, :],
                 _cast(b_dm * b_hm.to(tl.float32), p_dproj.dtype.element_ty, INTERPRET_BF16), mask=k_bn)
        tl.store(p_dhm + o_state, _cast(b_dm * b_xm.to(tl.float32), p_dhm.dtype.element_ty, INTERPRET_BF16),
                 mask=k_bn)
