"""The event-driven inference kernel (docs/DEPLOY.md): one numba function runs a whole batch.

A compiled network is a short program of ops over integer tables (deploy/engine_compile.py
writes them). Each thread takes a chunk of samples and runs every sample time step by time
step through all ops with its own small workspace (one membrane potential per live neuron,
one event list per activation map), so memory does not grow with the batch and there is no
Python in the loop over events, neurons or time.

Ops (column 0 of `ops`):
- GATHER: a dense first layer (it sees pixels or event frames): the current of each live
  neuron is the sum of its kept weights times the input; a static layer computes it once per
  sample and replays it every time step.
- SCATTER: every event of the input map adds value x weight to each kept synapse's target,
  if that target is live; `sops` counts value per addition (a spike 1, an average-pooled
  event k/4, a SEW sum its multiplicity: the energy report's quantity, docs/METHOD.md §5).
- NEURON: LIF or IF update of the live neurons only, spikes out as events.
- OUTPUT: a real-valued layer (VGG vote layer, SEW head): current + bias per output.
- MAXPOOL / AVGPOOL / ADD: event maps to event maps.

Arithmetic is float64 throughout: inputs are exact small dyadic numbers and weights are
float32 values folded with BatchNorm in float64, so each current is the exact one to ~1e-16
relative, far below float32 rounding (docs/DEPLOY.md, exactness).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

GATHER, SCATTER, NEURON, OUTPUT, MAXPOOL, AVGPOOL, ADD = range(7)

# columns of the per-layer table `lay`
(L_CIN, L_HIN, L_WIN, L_COUT, L_HOUT, L_WOUT, L_STRIDE, L_PAD, L_PTR, L_LIVE, L_NLIVE,
 L_MASK, L_V, L_STATIC, L_SOFF, L_KIND, L_COUNT, L_REC, L_OUTSPIKE, L_BIAS) = range(20)
LAY_COLS = 20
# columns of the map table `maps`: offset into the event buffers, size, C, H, W
M_OFF, M_SIZE, M_C, M_H, M_W = range(5)
KIND_LIF, KIND_IF = 0, 1


@njit(cache=True, inline="always")
def _div(a, s):
    """Floor division by a stride: shifts for 1 and 2 (a 64-bit idiv costs ~40 cycles)."""
    if s == 1:
        return a
    if s == 2:
        return a >> 1
    return a // s


@njit(cache=True, fastmath=False, boundscheck=False)
def _sample(x, n, T, key0, ops, lay, maps, ptr, ent, wts, bias, live, livec, livemask, taus,
            out, sops, rec, record, ev_c, ev_y, ev_x, ev_val, ev_cnt, acc, vstate, static, dense,
            stamp):
    """One sample through all ops and time steps; workspace arrays are the thread's own.
    Events are (channel, row, column) triples, so no op divides to find where a spike is."""
    vstate[:] = 0.0
    n_in_t = x.shape[1]
    n_ops = ops.shape[0]
    for t in range(T):
        for o in range(n_ops):
            kind = ops[o, 0]
            if kind == GATHER:
                g = ops[o, 3]
                nl = lay[g, L_NLIVE]
                lo = lay[g, L_LIVE]
                so = lay[g, L_SOFF]
                is_static = lay[g, L_STATIC] != 0
                if (not is_static) or t == 0:
                    ti = 0 if (is_static or n_in_t == 1) else t
                    hin, win = lay[g, L_HIN], lay[g, L_WIN]
                    s, p = lay[g, L_STRIDE], lay[g, L_PAD]
                    pbase = lay[g, L_PTR]
                    for k in range(nl):
                        co = livec[lo + k, 0]
                        by = livec[lo + k, 1] * s - p
                        bx = livec[lo + k, 2] * s - p
                        total = 0.0
                        for e in range(ptr[pbase + co], ptr[pbase + co + 1]):
                            iy = by + ent[e, 1]
                            ix = bx + ent[e, 2]
                            if iy >= 0 and iy < hin and ix >= 0 and ix < win:
                                total += wts[e] * x[n, ti, (ent[e, 0] * hin + iy) * win + ix]
                        static[so + k] = total
                for k in range(nl):
                    acc[live[lo + k]] = static[so + k]
            elif kind == SCATTER:
                m = ops[o, 1]
                g = ops[o, 3]
                moff = maps[m, M_OFF]
                mh, mw = maps[m, M_H], maps[m, M_W]
                flat = lay[g, L_HIN] == 1 and lay[g, L_WIN] == 1 and mh * mw > 1
                hout, wout = lay[g, L_HOUT], lay[g, L_WOUT]
                hw_out = hout * wout
                s, p = lay[g, L_STRIDE], lay[g, L_PAD]
                pbase = lay[g, L_PTR]
                mbase = lay[g, L_MASK]
                slot = lay[g, L_COUNT]
                counted = 0.0
                for q in range(ev_cnt[m]):
                    val = ev_val[moff + q]
                    if flat:  # an FC layer reads the flattened map
                        ci = (ev_c[moff + q] * mh + ev_y[moff + q]) * mw + ev_x[moff + q]
                        y = 0
                        xx = 0
                    else:
                        ci = ev_c[moff + q]
                        y = ev_y[moff + q] + p
                        xx = ev_x[moff + q] + p
                    for e in range(ptr[pbase + ci], ptr[pbase + ci + 1]):
                        ny = y - ent[e, 1]
                        nx = xx - ent[e, 2]
                        if ny < 0 or nx < 0:
                            continue
                        if s != 1:
                            oy = _div(ny, s)
                            ox = _div(nx, s)
                            if oy * s != ny or ox * s != nx:
                                continue
                        else:
                            oy = ny
                            ox = nx
                        if oy >= hout or ox >= wout:
                            continue
                        j = ent[e, 0] * hw_out + oy * wout + ox
                        if livemask[mbase + j]:
                            acc[j] += wts[e] * val
                            counted += val
                if slot >= 0:
                    sops[n, slot] += counted
            elif kind == NEURON:
                g = ops[o, 3]
                m = ops[o, 2]
                moff = maps[m, M_OFF]
                nl = lay[g, L_NLIVE]
                lo = lay[g, L_LIVE]
                vo = lay[g, L_V]
                bo = lay[g, L_BIAS]
                is_lif = lay[g, L_KIND] == KIND_LIF
                tau = taus[g]
                ro = lay[g, L_REC]
                outspike = lay[g, L_OUTSPIKE] != 0
                c = 0
                for k in range(nl):
                    j = live[lo + k]
                    cur = acc[j] + bias[bo + livec[lo + k, 0]]
                    acc[j] = 0.0
                    v = vstate[vo + k]
                    if is_lif:
                        h = v + (cur - v) / tau
                    else:
                        h = v + cur
                    if h >= 1.0:
                        vstate[vo + k] = 0.0
                        ev_c[moff + c] = livec[lo + k, 0]
                        ev_y[moff + c] = livec[lo + k, 1]
                        ev_x[moff + c] = livec[lo + k, 2]
                        ev_val[moff + c] = 1.0
                        c += 1
                        if record:
                            rec[n, t, ro + j] = 1
                        if outspike:
                            out[n, t, j] = 1.0
                    else:
                        vstate[vo + k] = h
                ev_cnt[m] = c
            elif kind == OUTPUT:
                g = ops[o, 3]
                bo = lay[g, L_BIAS]
                for j in range(lay[g, L_COUT]):
                    out[n, t, j] = acc[j] + bias[bo + j]
                    acc[j] = 0.0
            elif kind == MAXPOOL or kind == AVGPOOL:
                mi, mo = ops[o, 1], ops[o, 2]
                k_, s, p = ops[o, 4], ops[o, 5], ops[o, 6]
                hout, wout = maps[mo, M_H], maps[mo, M_W]
                ioff, ooff = maps[mi, M_OFF], maps[mo, M_OFF]
                key = key0 + t * n_ops + o
                c = 0
                for q in range(ev_cnt[mi]):
                    val = ev_val[ioff + q]
                    ch = ev_c[ioff + q]
                    y = ev_y[ioff + q] + p
                    xx = ev_x[ioff + q] + p
                    # pooled outputs whose window [o*s - p, o*s - p + k) holds the event
                    oy0 = max(0, _div(y - k_ + s, s))
                    oy1 = min(hout - 1, _div(y, s))
                    ox0 = max(0, _div(xx - k_ + s, s))
                    ox1 = min(wout - 1, _div(xx, s))
                    for oy in range(oy0, oy1 + 1):
                        for ox in range(ox0, ox1 + 1):
                            j = (ch * hout + oy) * wout + ox
                            if stamp[j] != key:
                                stamp[j] = key
                                dense[j] = 0.0
                                ev_c[ooff + c] = ch
                                ev_y[ooff + c] = oy
                                ev_x[ooff + c] = ox
                                c += 1
                            if kind == MAXPOOL:
                                dense[j] = max(dense[j], val)
                            else:
                                dense[j] += val
                inv = 1.0 / (k_ * k_)
                for q in range(c):
                    j = (ev_c[ooff + q] * hout + ev_y[ooff + q]) * wout + ev_x[ooff + q]
                    ev_val[ooff + q] = dense[j] * inv if kind == AVGPOOL else dense[j]
                ev_cnt[mo] = c
            elif kind == ADD:
                ma, mb, mo = ops[o, 1], ops[o, 4], ops[o, 2]
                hh, ww = maps[mo, M_H], maps[mo, M_W]
                ooff = maps[mo, M_OFF]
                key = key0 + t * n_ops + o
                c = 0
                for src in (ma, mb):
                    soff = maps[src, M_OFF]
                    for q in range(ev_cnt[src]):
                        j = (ev_c[soff + q] * hh + ev_y[soff + q]) * ww + ev_x[soff + q]
                        if stamp[j] != key:
                            stamp[j] = key
                            dense[j] = 0.0
                            ev_c[ooff + c] = ev_c[soff + q]
                            ev_y[ooff + c] = ev_y[soff + q]
                            ev_x[ooff + c] = ev_x[soff + q]
                            c += 1
                        dense[j] += ev_val[soff + q]
                for q in range(c):
                    j = (ev_c[ooff + q] * hh + ev_y[ooff + q]) * ww + ev_x[ooff + q]
                    ev_val[ooff + q] = dense[j]
                ev_cnt[mo] = c


@njit(cache=True, parallel=True, fastmath=False, boundscheck=False)
def run_batch(x, T, ops, lay, maps, ptr, ent, wts, bias, live, livec, livemask, taus, sizes,
              out, sops, rec, record, chunks):
    """x [N, T_in, input size] float64 -> out [N, T, K], sops [N, counted layers], rec.

    `sizes` = (total event slots, largest map, live neurons, gathered neurons); `chunks` + 1
    boundaries split the samples among threads, each with one workspace."""
    n_chunks = chunks.shape[0] - 1
    for c in prange(n_chunks):
        ev_c = np.empty(sizes[0], np.int32)
        ev_y = np.empty(sizes[0], np.int32)
        ev_x = np.empty(sizes[0], np.int32)
        ev_val = np.empty(sizes[0], np.float64)
        ev_cnt = np.zeros(maps.shape[0], np.int64)
        acc = np.zeros(sizes[1], np.float64)
        dense = np.zeros(sizes[1], np.float64)
        stamp = np.full(sizes[1], -1, np.int64)
        vstate = np.zeros(max(sizes[2], 1), np.float64)
        static = np.zeros(max(sizes[3], 1), np.float64)
        for n in range(chunks[c], chunks[c + 1]):
            ev_cnt[:] = 0
            # stamps are unique per (sample, step, op): no per-sample reset of `stamp`
            key0 = (n - chunks[c]) * T * ops.shape[0]
            _sample(x, n, T, key0, ops, lay, maps, ptr, ent, wts, bias, live, livec, livemask, taus,
                    out, sops, rec, record, ev_c, ev_y, ev_x, ev_val, ev_cnt, acc, vstate, static,
                    dense, stamp)
