"""The @triton.jit kernels of the `triton` attention backend (launched by kernels/attention_triton.py).

Work items, not (sequence, block) grids: each program owns one block of consecutive tokens of the packed stream
(kernels/block_plan.py), which may span several short sequences, and reads from its item row what to visit:
    [first row, lo, hi, full_lo, full_hi]
columns lo .. hi-1 (the union of its rows' ranges) and, inside them, full_lo .. full_hi-1, which every row
reaches. Which key a query sees comes from the plan's per-token bounds, BOUNDS[0, i] <= j < BOUNDS[1, i]
(document and window in one test), so the kernels know nothing of sequences or windows and the grid has
exactly cdiv(tokens, block) programs per head: none exits empty, whatever the number of (zero-length)
sequences. The visited columns run in three stages: tiles before the full range (masked), tiles inside it
(no mask arithmetic, no load masks), tiles after it (masked).

Forward and dQ: rows are queries, columns keys. dK/dV: rows are keys, columns the queries that see them (the
plan's items for that pass come from the mirrored bounds), so no atomics are needed.
"""
import triton
import triton.language as tl

from megatron_cmbert.kernels.triton_common import cast

# Finite "minus infinity": a fully masked tile then gives exp2(0) terms, later rescaled by 0. A constexpr,
# because compiled kernels may only read constexpr globals (the interpreter reads any).
MASKED = tl.constexpr(-1.0e30)
ITEM_FIELDS = tl.constexpr(5)


@triton.jit
def _item(ITEMS, STEP: tl.constexpr):
    """(first own row, stage bounds) of this program's item. Tiles of STEP start at lo; stage 1 is the whole
    tiles inside [full_lo, full_hi); stage 0 the tiles before it, stage 2 the tiles after it (both masked)."""
    row = ITEMS + tl.program_id(0).to(tl.int64) * ITEM_FIELDS
    own0 = tl.load(row)
    lo = tl.load(row + 1)
    hi = tl.load(row + 2)
    full_lo = tl.load(row + 3)
    full_hi = tl.load(row + 4)
    mid_lo = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), STEP) * STEP
    mid_hi = mid_lo + (tl.maximum(full_hi - mid_lo, 0) // STEP) * STEP
    end0 = tl.minimum(mid_lo, hi)
    start2 = tl.maximum(mid_hi, end0)
    return own0, lo, hi, end0, mid_lo, mid_hi, start2


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, BOUNDS, ITEMS, scale_log2, total,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, INTERP: tl.constexpr):
    head = tl.program_id(1)
    q0, lo, hi, end0, mid_lo, mid_hi, start2 = _item(ITEMS, BLOCK_N)
    rows = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < total
    row_lo = tl.load(BOUNDS + rows, mask=row_ok, other=0)
    row_hi = tl.load(BOUNDS + total + rows, mask=row_ok, other=0)
    r64 = rows.to(tl.int64)
    q = tl.load(Q + r64[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
    k_base = K + head * stride_kh
    v_base = V + head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(3):
        if stage == 0:
            n_begin, n_end = lo, end0
        elif stage == 1:
            n_begin, n_end = mid_lo, mid_hi
        else:
            n_begin, n_end = start2, hi
        for n0 in range(n_begin, n_end, BLOCK_N):
            cols = n0 + offs_n
            c64 = cols.to(tl.int64)
            if stage == 1:  # inside every row's range: all columns are real tokens
                kv_mask = (cols >= 0)[:, None] & d_ok[None, :]
            else:
                kv_mask = (cols < hi)[:, None] & d_ok[None, :]
            k = tl.load(k_base + c64[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            if INTERP:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            if stage != 1:
                keep = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
                qk = tl.where(keep, qk, MASKED)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + c64[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            p_in = cast(p, V.dtype.element_ty, INTERP)  # P rounded to the input precision, as tensor cores get it
            if INTERP:
                v, p_in = v.to(tl.float32), p_in.to(tl.float32)
            acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + r64[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             cast(out, O.dtype.element_ty, INTERP), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + head.to(tl.int64) * total + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, total, heads, stride_ot, stride_oh, stride_dt, stride_dh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d o * do: the row term of softmax's backward, computed once per row."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tokens < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    t64 = tokens.to(tl.int64)[:, None]
    o = tl.load(O + t64 * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + t64 * stride_dt + head * stride_dh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head.to(tl.int64) * total + tokens, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=tokens < total)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BOUNDS, ITEMS, scale, scale_log2, total,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr):
    head = tl.program_id(1)
    # Own rows are keys; the item's columns are the queries that see some of them.
    n0, lo, hi, end0, mid_lo, mid_hi, start2 = _item(ITEMS, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < total
    c64 = cols.to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + c64[:, None] * stride_kt + head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + c64[:, None] * stride_vt + head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if INTERP:
        k, v = k.to(tl.float32), v.to(tl.float32)
    q_base = Q + head * stride_qh
    do_base = DO + head * stride_doh
    row_base = head.to(tl.int64) * total

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for stage in tl.static_range(3):
        if stage == 0:
            m_begin, m_end = lo, end0
        elif stage == 1:
            m_begin, m_end = mid_lo, mid_hi
        else:
            m_begin, m_end = start2, hi
        for m0 in range(m_begin, m_end, BLOCK_M):
            rows = m0 + offs_m
            if stage == 1:
                row_ok = rows >= 0
            else:
                row_ok = rows < hi
            r64 = rows.to(tl.int64)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + r64[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + r64[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            if INTERP:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            # Transposed scores (keys x queries) so dK, dV accumulate as plain (BLOCK_N, D) products.
            p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - lse[None, :])
            if stage != 1:
                q_lo = tl.load(BOUNDS + rows, mask=row_ok, other=0)
                q_hi = tl.load(BOUNDS + total + rows, mask=row_ok, other=0)
                keep = (cols[:, None] >= q_lo[None, :]) & (cols[:, None] < q_hi[None, :])
                p_t = tl.where(keep, p_t, 0.0)
            p_in = cast(p_t, DO.dtype.element_ty, INTERP)
            if INTERP:
                p_in = p_in.to(tl.float32)
            dv = tl.dot(p_in, do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            ds_in = cast(ds_t, Q.dtype.element_ty, INTERP)
            if INTERP:
                ds_in = ds_in.to(tl.float32)
            dk = tl.dot(ds_in, q, dk, input_precision=PRECISION)
    tl.store(DK + c64[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
             cast(dk * scale, DK.dtype.element_ty, INTERP), mask=kv_mask)
    tl.store(DV + c64[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
             cast(dv, DV.dtype.element_ty, INTERP), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, BOUNDS, ITEMS, scale, scale_log2, total,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, INTERP: tl.constexpr):
    head = tl.program_id(1)
    q0, lo, hi, end0, mid_lo, mid_hi, start2 = _item(ITEMS, BLOCK_N)  # the forward's items and stages
    rows = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < total
    row_lo = tl.load(BOUNDS + rows, mask=row_ok, other=0)
    row_hi = tl.load(BOUNDS + total + rows, mask=row_ok, other=0)
    r64 = rows.to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + r64[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + r64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    if INTERP:
        q, do = q.to(tl.float32), do.to(tl.float32)
    row_base = head.to(tl.int64) * total
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    k_base = K + head * stride_kh
    v_base = V + head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(3):
        if stage == 0:
            n_begin, n_end = lo, end0
        elif stage == 1:
            n_begin, n_end = mid_lo, mid_hi
        else:
            n_begin, n_end = start2, hi
        for n0 in range(n_begin, n_end, BLOCK_N):
            cols = n0 + offs_n
            c64 = cols.to(tl.int64)
            if stage == 1:
                kv_mask = (cols >= 0)[:, None] & d_ok[None, :]
            else:
                kv_mask = (cols < hi)[:, None] & d_ok[None, :]
            k = tl.load(k_base + c64[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + c64[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if INTERP:
                k, v = k.to(tl.float32), v.to(tl.float32)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - lse[:, None])
            if stage != 1:
                keep = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            ds_in = cast(ds, K.dtype.element_ty, INTERP)
            if INTERP:
                ds_in = ds_in.to(tl.float32)
            dq = tl.dot(ds_in, k, dq, input_precision=PRECISION)
    tl.store(DQ + r64[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             cast(dq * scale, DQ.dtype.element_ty, INTERP), mask=q_mask)
