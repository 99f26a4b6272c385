"""Fused Triton kernels for one time step of the multiplicative LSTM, forward and backward.

Legend
    B  batch rows             H  hidden units            G = 4 gates, order i, f, o, u
    BB rows per program        BN hidden units per program   BK reduction block
    p_ pointers, b_ blocks (register tiles), o_ offsets, m_ masks, i_ program ids

Layouts (all row-major and contiguous; the driver guarantees it):
    proj_t  [B, 5H]  x Wx + b (gates) then xm = x Wmx     act_t [B, 6H]  gates, xm, hm (saved)
    w_hh    [4H, H]  torch [out, in] layout, applied to m w_hm  [H, H]    applied to h
    h, m, dhm [B, H] activation dtype                     c, dh, dc [B, H] float32

A forward step is two launches because m_t must be complete before any gate can use it:
    fwd_m_kernel: hm = h_{t-1} Wmh^T              epilogue m = xm * hm
    fwd_z_kernel: z = xg + m Wh^T (4 gate tiles)  epilogue gates, c_t, h_t (and the padding mask)
A backward step is the mirror image:
    bwd_h_kernel: dh_t = dhm_{t+1} Wmh + dout_t    epilogue the cell derivatives -> dz_t, dc_{t-1}
    bwd_m_kernel: dm = dz_t Wh                     epilogue dxm = dm * hm, dhm = dm * xm
Each program owns BN hidden units of BB rows and the same units of all four gates, so every
pointwise value it needs sits in its own registers: nothing intermediate goes back to memory.
"""

import triton
import triton.language as tl


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
def _tile(B, H, BB: tl.constexpr, BN: tl.constexpr):
    """The rows and hidden units this program owns (grid: hidden blocks x batch blocks), with masks."""
    o_b = tl.program_id(1) * BB + tl.arange(0, BB)
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    return o_b, o_n, o_b < B, o_n < H


@triton.jit
def fwd_m_kernel(
    p_h, p_w_hm, p_proj, p_m, p_act, B, H,
    SAVE: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    o_b, o_n, m_b, m_n = _tile(B, H, BB, BN)

    b_hm = tl.zeros([BB, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < H
        b_h = tl.load(p_h + o_b[:, None] * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        # Wmh^T tile: element (k, n) is w_hm[n, k].
        b_w = tl.load(p_w_hm + o_n[None, :] * H + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_hm = _mma(b_h, b_w, b_hm, PRECISION, INTERPRET_BF16)

    m_bn = m_b[:, None] & m_n[None, :]
    b_xm = tl.load(p_proj + o_b[:, None] * (5 * H) + 4 * H + o_n[None, :], mask=m_bn, other=0.0)
    b_m = b_hm * b_xm.to(tl.float32)
    tl.store(p_m + o_b[:, None] * H + o_n[None, :], _cast(b_m, p_m.dtype.element_ty, INTERPRET_BF16), mask=m_bn)
    if SAVE:
        p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
        tl.store(p_a + 4 * H, b_xm, mask=m_bn)
        tl.store(p_a + 5 * H, _cast(b_hm, p_act.dtype.element_ty, INTERPRET_BF16), mask=m_bn)


@triton.jit
def fwd_z_kernel(
    p_m, p_w_hh, p_proj, p_h_prev, p_c_prev, p_h, p_c, p_act, p_len, t, B, H,
    SAVE: tl.constexpr, HAS_LEN: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    o_b, o_n, m_b, m_n = _tile(B, H, BB, BN)
    # Offset between gate blocks of w_hh; the driver keeps 4 H^2 below 2^31.
    gate_stride = H * H

    b_zi = tl.zeros([BB, BN], dtype=tl.float32)
    b_zf = tl.zeros([BB, BN], dtype=tl.float32)
    b_zo = tl.zeros([BB, BN], dtype=tl.float32)
    b_zu = tl.zeros([BB, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < H
        b_m = tl.load(p_m + o_b[:, None] * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        p_w = p_w_hh + o_n[None, :] * H + o_k[:, None]
        m_w = m_k[:, None] & m_n[None, :]
        b_zi = _mma(b_m, tl.load(p_w, mask=m_w, other=0.0), b_zi, PRECISION, INTERPRET_BF16)
        b_zf = _mma(b_m, tl.load(p_w + gate_stride, mask=m_w, other=0.0), b_zf, PRECISION, INTERPRET_BF16)
        b_zo = _mma(b_m, tl.load(p_w + 2 * gate_stride, mask=m_w, other=0.0), b_zo, PRECISION, INTERPRET_BF16)
        b_zu = _mma(b_m, tl.load(p_w + 3 * gate_stride, mask=m_w, other=0.0), b_zu, PRECISION, INTERPRET_BF16)

    m_bn = m_b[:, None] & m_n[None, :]
    p_x = p_proj + o_b[:, None] * (5 * H) + o_n[None, :]
    b_i = _sigmoid(b_zi + tl.load(p_x, mask=m_bn, other=0.0).to(tl.float32))
    b_f = _sigmoid(b_zf + tl.load(p_x + H, mask=m_bn, other=0.0).to(tl.float32))
    b_o = _sigmoid(b_zo + tl.load(p_x + 2 * H, mask=m_bn, other=0.0).to(tl.float32))
    b_u = _tanh(b_zu + tl.load(p_x + 3 * H, mask=m_bn, other=0.0).to(tl.float32))

    o_state = o_b[:, None] * H + o_n[None, :]
    b_c_prev = tl.load(p_c_prev + o_state, mask=m_bn, other=0.0)
    b_c = b_f * b_c_prev + b_i * b_u
    b_h = b_o * _tanh(b_c)
    if HAS_LEN:
        # A row past its length keeps its state: h and c are carried through unchanged.
        b_active = (t < tl.load(p_len + o_b, mask=m_b, other=0))[:, None]
        b_h_prev = tl.load(p_h_prev + o_state, mask=m_bn, other=0.0).to(tl.float32)
        b_c = tl.where(b_active, b_c, b_c_prev)
        b_h = tl.where(b_active, b_h, b_h_prev)
    tl.store(p_c + o_state, b_c, mask=m_bn)
    tl.store(p_h + o_state, _cast(b_h, p_h.dtype.element_ty, INTERPRET_BF16), mask=m_bn)
    if SAVE:
        p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
        dtype = p_act.dtype.element_ty
        tl.store(p_a, _cast(b_i, dtype, INTERPRET_BF16), mask=m_bn)
        tl.store(p_a + H, _cast(b_f, dtype, INTERPRET_BF16), mask=m_bn)
        tl.store(p_a + 2 * H, _cast(b_o, dtype, INTERPRET_BF16), mask=m_bn)
        tl.store(p_a + 3 * H, _cast(b_u, dtype, INTERPRET_BF16), mask=m_bn)


@triton.jit
def bwd_h_kernel(
    p_dhm_next, p_w_hm, p_dout, p_dh, p_dc, p_dcells, p_act, p_c, p_c_prev, p_dproj, p_len, t, B, H,
    HAS_REC: tl.constexpr, DO_CELL: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DCELLS: tl.constexpr,
    HAS_LEN: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    """dh_t = dhm_{t+1} Wmh (+ dout_t), then the cell derivatives of step t.

    HAS_REC is false at t = T-1 (nothing comes from the future); DO_CELL is false for the extra
    launch at t = -1 that only produces the gradient of h0 (left in p_dh).
    """
    o_b, o_n, m_b, m_n = _tile(B, H, BB, BN)
    m_bn = m_b[:, None] & m_n[None, :]
    o_state = o_b[:, None] * H + o_n[None, :]

    # p_dh holds the full gradient that reached h_{t+1}.
    b_dh = tl.load(p_dh + o_state, mask=m_bn, other=0.0)
    if HAS_LEN:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)
    if HAS_REC:
        b_rec = tl.zeros([BB, BN], dtype=tl.float32)
        for k0 in range(0, H, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < H
            b_g = tl.load(p_dhm_next + o_b[:, None] * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_w_hm + o_k[:, None] * H + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
            b_rec = _mma(b_g, b_w, b_rec, PRECISION, INTERPRET_BF16)
        if HAS_LEN:
            # A row that was padding at t+1 passed h_t through, so its gradient passes straight back.
            b_dh = b_rec + tl.where((t + 1 < b_len)[:, None], 0.0, b_dh)
        else:
            b_dh = b_rec

    if DO_CELL:
        if HAS_DOUT:
            b_dh += tl.load(p_dout + o_state, mask=m_bn, other=0.0).to(tl.float32)
        tl.store(p_dh + o_state, b_dh, mask=m_bn)

        p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
        b_i = tl.load(p_a, mask=m_bn, other=0.0).to(tl.float32)
        b_f = tl.load(p_a + H, mask=m_bn, other=0.0).to(tl.float32)
        b_o = tl.load(p_a + 2 * H, mask=m_bn, other=0.0).to(tl.float32)
        b_u = tl.load(p_a + 3 * H, mask=m_bn, other=0.0).to(tl.float32)
        b_c = tl.load(p_c + o_state, mask=m_bn, other=0.0)
        b_c_prev = tl.load(p_c_prev + o_state, mask=m_bn, other=0.0)
        b_dc = tl.load(p_dc + o_state, mask=m_bn, other=0.0)
        if HAS_DCELLS:
            b_dc += tl.load(p_dcells + o_state, mask=m_bn, other=0.0).to(tl.float32)

        b_tanh_c = _tanh(b_c)
        b_dc_from_h = b_dh * b_o * (1.0 - b_tanh_c * b_tanh_c)
        if HAS_LEN:
            b_active = (t < b_len)[:, None]
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
        tl.store(p_dc + o_state, b_dc_prev, mask=m_bn)

        p_dz = p_dproj + o_b[:, None] * (5 * H) + o_n[None, :]
        dtype = p_dproj.dtype.element_ty
        tl.store(p_dz, _cast(b_dzi, dtype, INTERPRET_BF16), mask=m_bn)
        tl.store(p_dz + H, _cast(b_dzf, dtype, INTERPRET_BF16), mask=m_bn)
        tl.store(p_dz + 2 * H, _cast(b_dzo, dtype, INTERPRET_BF16), mask=m_bn)
        tl.store(p_dz + 3 * H, _cast(b_dzu, dtype, INTERPRET_BF16), mask=m_bn)
    else:
        tl.store(p_dh + o_state, b_dh, mask=m_bn)


@triton.jit
def bwd_m_kernel(
    p_dproj, p_w_hh, p_act, p_dhm, B, H,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    """dm = dz_t Wh over K = 4H, then dxm = dm * hm (into dproj) and dhm = dm * xm."""
    o_b, o_n, m_b, m_n = _tile(B, H, BB, BN)

    b_dm = tl.zeros([BB, BN], dtype=tl.float32)
    for k0 in range(0, 4 * H, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < 4 * H
        b_dz = tl.load(p_dproj + o_b[:, None] * (5 * H) + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_w_hh + o_k[:, None] * H + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_dm = _mma(b_dz, b_w, b_dm, PRECISION, INTERPRET_BF16)

    m_bn = m_b[:, None] & m_n[None, :]
    p_a = p_act + o_b[:, None] * (6 * H) + o_n[None, :]
    b_xm = tl.load(p_a + 4 * H, mask=m_bn, other=0.0).to(tl.float32)
    b_hm = tl.load(p_a + 5 * H, mask=m_bn, other=0.0).to(tl.float32)
    tl.store(p_dproj + o_b[:, None] * (5 * H) + 4 * H + o_n[None, :],
             _cast(b_dm * b_hm, p_dproj.dtype.element_ty, INTERPRET_BF16), mask=m_bn)
    tl.store(p_dhm + o_b[:, None] * H + o_n[None, :], _cast(b_dm * b_xm, p_dhm.dtype.element_ty, INTERPRET_BF16), mask=m_bn)
