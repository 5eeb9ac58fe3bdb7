"""The event-driven inference kernel (docs/DEPLOY.md): numba functions that run a whole batch.

A compiled network is a short program of ops over integer tables (deploy/engine_compile.py
writes them). Each thread takes a chunk of samples and runs every sample time step by time
step through all ops with its own workspace (one membrane potential per live neuron, one
event list per activation map, made once per engine), so memory does not grow with the batch
and there is no Python in the loop over events, neurons or time. Each op is its own small
function over 1-D views: the compiler optimises a short loop far better than one long one.

An event is its flat index in its map and its value (a spike 1, an average-pooled event k/4,
a SEW sum its multiplicity): every op finds its targets through a table row of that index,
so no op computes coordinates. Indices are unsigned (uint32 events and targets, uint64 row
pointers): numba then drops the negative-index fix-up from every array access, which made a
scatter 1.4-1.7x slower. Mixing uint64 with int64 arithmetic types as float64 in numba, so
unsigned values only index or compare.

Ops (column 0 of `ops`):
- GATHER: a dense first layer (it sees pixels or event frames): per output channel, the
  channel's map from a zero-padded input, vectorised, read at the live neurons; a static layer
  computes it once per sample and replays it every time step.
- SCATTER: every event adds value x weight along its row (the kept synapses that land on live
  neurons); a "dense" layer (an FC layer that keeps most synapses) stores full rows with the
  pruned weights as 0, which vectorises and adds the same sums (float32 rows when every weight
  is a float32 value: half the bytes, the same float64 products). `sops` counts value per kept
  synapse: the energy report's quantity (docs/METHOD.md §5).
- NEURON: LIF or IF update of the live neurons only, spikes out as events.
- OUTPUT: a real-valued layer (VGG vote layer, SEW head): current + bias per output.
- MAXPOOL / AVGPOOL (a row per input position: the pooled outputs whose window holds it) and
  ADD (the same positions in both maps): event maps to event maps.

Arithmetic is float64 throughout: inputs are exact small dyadic numbers and weights are
float32 values folded with BatchNorm in float64, so each current is the exact one to ~1e-16
relative, far below float32 rounding (docs/DEPLOY.md, exactness). Each neuron's sum takes its
terms in one fixed order (events in order, kernel entries in PyTorch's (ci, ky, kx) order); a
pruned weight stored as 0 adds exactly 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

GATHER, SCATTER, NEURON, OUTPUT, MAXPOOL, AVGPOOL, ADD = range(7)

# columns of the per-layer table `lay`
(L_COUT, L_PTR, L_LIVE, L_NLIVE, L_V, L_STATIC, L_SOFF, L_KIND, L_COUNT, L_REC, L_OUTSPIKE,
 L_BIAS, L_CIN, L_HIN, L_WIN, L_PAD, L_DENSE, L_HOUT, L_WOUT, L_STRIDE, L_SIZE) = range(21)
LAY_COLS = 21
# columns of the map table `maps`: offset into the event buffers, size, C, H, W
M_OFF, M_SIZE, M_C, M_H, M_W = range(5)
KIND_LIF, KIND_IF = 0, 1
_JIT = dict(cache=True, fastmath=False, boundscheck=False)


@njit(**_JIT)
def _gather(xt, cin, hin, win, pd, hout, wout, s, xpad, eptr, kptr, idx, wts, pos, cur, plane):
    """cur[k] of each live neuron of the first layer. Per output channel its whole map is
    computed from the zero-padded input, weight by weight (vectorised: the layer has no neuron
    mask, so its weighted channels are live nearly everywhere), and the live neurons read at
    their positions `pos`. At unit stride the map is laid out at the padded input's row width,
    so each weight is one contiguous loop over the whole map (the columns past wout are never
    read); `xpad` has a row of slack for it. Only the interior of `xpad` is written: its zero
    border is the workspace's (one first layer per network)."""
    hp, wp = hin + 2 * pd, win + 2 * pd
    for ci in range(cin):
        for yy in range(hin):
            dst = (ci * hp + yy + pd) * wp + pd
            src = (ci * hin + yy) * win
            for xx in range(win):
                xpad[dst + xx] = xt[src + xx]
    n = hout * wp if s == 1 else hout * wout
    for co in range(eptr.size - 1):
        k0, k1 = kptr[co], kptr[co + 1]
        if k1 == k0:
            continue
        a = plane[:n]
        a[:] = 0.0
        for e in range(eptr[co], eptr[co + 1]):
            w = wts[e]
            off = idx[e]
            if s == 1:
                b = xpad[off:off + n]
                for j in range(n):
                    a[j] += w * b[j]
            else:
                for oy in range(hout):
                    src = oy * s * wp + off
                    for ox in range(wout):
                        a[oy * wout + ox] += w * xpad[src + ox * s]
        for k in range(k0, k1):
            cur[k] = a[pos[k]]


@njit(**_JIT)
def _scatter(ev, val, rptr, idx, wts, acc):
    """Each event adds value x weight along its row; returns the value-weighted synapse count."""
    counted = 0.0
    for q in range(ev.size):
        v = val[q]
        i = ev[q]
        e0, e1 = rptr[i], rptr[i + 1]
        for e in range(e0, e1):
            acc[idx[e]] += wts[e] * v
        counted += v * (e1 - e0)
    return counted


@njit(**_JIT)
def _scatter_dense(ev, val, rptr, kept, wts, acc):
    """Rows of all live targets (row length = acc.size, pruned weights 0); `kept` counts a
    row's kept synapses."""
    counted = 0.0
    nl = np.uint64(acc.size)  # unsigned with the row pointers (module doc)
    for q in range(ev.size):
        v = val[q]
        i = ev[q]
        e0 = rptr[i]
        if rptr[i + 1] > e0:
            w = wts[e0:e0 + nl]
            for k in range(nl):
                acc[k] += w[k] * v
            counted += v * kept[i]
    return counted


@njit(**_JIT)
def _neuron(acc, lb, vs, spk, live, ev, val, is_lif, inv_tau, first):
    """Update, reset and fire the live neurons; their spikes out as events; returns the count.
    The first time step starts from v = 0 without reading `vs` (no clearing per sample). LIF
    multiplies by 1 / tau (exact for the usual tau = 2; otherwise within 1 float64 ulp of the
    division, far below the float32 rounding of the reference)."""
    nl = lb.size
    for k in range(nl):  # branches on per-call flags only: the compiler vectorises each case
        x = acc[k] + lb[k]
        if first:
            h = x * inv_tau if is_lif else x
        elif is_lif:
            h = vs[k] + (x - vs[k]) * inv_tau
        else:
            h = vs[k] + x
        acc[k] = 0.0
        f = h >= 1.0
        spk[k] = f
        vs[k] = 0.0 if f else h
    c = 0
    for k in range(nl):  # every neuron written, only a spike advances: no branch
        ev[c] = live[k]
        c += spk[k]
    val[:c] = 1.0
    return c


@njit(**_JIT)
def _pool(ev, val, rptr, idx, is_max, inv, key, stamp, dense, out_ev, out_val):
    """Events to the pooled outputs whose window holds them (a row per input position), in
    first-touch order; max or mean (inv = 1 / window size) of the values."""
    c = 0
    for q in range(ev.size):
        v = val[q]
        i = ev[q]
        for e in range(rptr[i], rptr[i + 1]):
            j = idx[e]
            if stamp[j] != key:
                stamp[j] = key
                dense[j] = 0.0
                out_ev[c] = j
                c += 1
            if is_max:
                dense[j] = max(dense[j], v)
            else:
                dense[j] += v
    for q in range(c):
        out_val[q] = dense[out_ev[q]] * inv
    return c


@njit(**_JIT)
def _union(ev, val, c, key, stamp, dense, out_ev):
    for q in range(ev.size):
        j = ev[q]
        if stamp[j] != key:
            stamp[j] = key
            dense[j] = 0.0
            out_ev[c] = j
            c += 1
        dense[j] += val[q]
    return c


@njit(**_JIT)
def _add(ev_a, val_a, ev_b, val_b, key, stamp, dense, out_ev, out_val):
    """SEW ADD: the union of two event maps over the same positions, values summed."""
    c = _union(ev_a, val_a, 0, key, stamp, dense, out_ev)
    c = _union(ev_b, val_b, c, key, stamp, dense, out_ev)
    for q in range(c):
        out_val[q] = dense[out_ev[q]]
    return c


@njit(**_JIT)
def _sample(x, n, T, key0, ops, lay, maps, ptr, idx, wts, wts32, bias, lbias, lbase, live, inv_taus,
            out, sops, rec, record, ev_i, ev_val, ev_cnt, acc, spk, vstate, static, dense, stamp, xpad):
    """One sample through all ops and time steps; workspace arrays are the thread's own.
    `acc` holds the input current of the layer being computed, indexed by live neuron (rows
    store those indices). Stamps are unique per (sample, step, op): key0 + t * ops + o."""
    n_in_t = x.shape[1]
    n_ops = ops.shape[0]
    for t in range(T):
        for o in range(n_ops):
            kind = ops[o, 0]
            g = ops[o, 3]
            if kind == GATHER:
                nl, lo, so = lay[g, L_NLIVE], lay[g, L_LIVE], lay[g, L_SOFF]
                is_static = lay[g, L_STATIC] != 0
                if (not is_static) or t == 0:
                    pb, cout = lay[g, L_PTR], lay[g, L_COUT]
                    _gather(x[n, 0 if (is_static or n_in_t == 1) else t], lay[g, L_CIN], lay[g, L_HIN],
                            lay[g, L_WIN], lay[g, L_PAD], lay[g, L_HOUT], lay[g, L_WOUT], lay[g, L_STRIDE], xpad,
                            ptr[pb:pb + cout + 1], ptr[pb + cout + 1:pb + 2 * cout + 2], idx, wts,
                            lbase[lo:lo + nl], static[so:so + nl], dense)
                acc[:nl] = static[so:so + nl]
            elif kind == SCATTER:
                m = ops[o, 1]
                a, b = maps[m, M_OFF], maps[m, M_OFF] + ev_cnt[m]
                pb = lay[g, L_PTR]
                if lay[g, L_DENSE] != 0:
                    size = lay[g, L_SIZE]
                    rptr, kept = ptr[pb:pb + size + 1], ptr[pb + size + 1:pb + 2 * size + 1]
                    cur = acc[:lay[g, L_NLIVE]]
                    if lay[g, L_DENSE] == 2:
                        counted = _scatter_dense(ev_i[a:b], ev_val[a:b], rptr, kept, wts32, cur)
                    else:
                        counted = _scatter_dense(ev_i[a:b], ev_val[a:b], rptr, kept, wts, cur)
                else:
                    counted = _scatter(ev_i[a:b], ev_val[a:b], ptr[pb:], idx, wts, acc)
                if lay[g, L_COUNT] >= 0:
                    sops[n, lay[g, L_COUNT]] += counted
            elif kind == NEURON:
                m = ops[o, 2]
                moff = maps[m, M_OFF]
                nl, lo, vo = lay[g, L_NLIVE], lay[g, L_LIVE], lay[g, L_V]
                c = _neuron(acc, lbias[lo:lo + nl], vstate[vo:vo + nl], spk, live[lo:lo + nl], ev_i[moff:],
                            ev_val[moff:], lay[g, L_KIND] == KIND_LIF, inv_taus[g], t == 0)
                ev_cnt[m] = c
                if record:
                    ro = lay[g, L_REC]
                    for q in range(c):
                        rec[n, t, ro + ev_i[moff + q]] = 1
                if lay[g, L_OUTSPIKE] != 0:
                    for q in range(c):
                        out[n, t, ev_i[moff + q]] = 1.0
            elif kind == OUTPUT:  # every neuron of a real-valued layer is live: index = output
                bo = lay[g, L_BIAS]
                for j in range(lay[g, L_COUT]):
                    out[n, t, j] = acc[j] + bias[bo + j]
                    acc[j] = 0.0
            elif kind == MAXPOOL or kind == AVGPOOL:
                mi, mo = ops[o, 1], ops[o, 2]
                a, b = maps[mi, M_OFF], maps[mi, M_OFF] + ev_cnt[mi]
                ooff = maps[mo, M_OFF]
                win = ops[o, 4]
                ev_cnt[mo] = _pool(ev_i[a:b], ev_val[a:b], ptr[ops[o, 5]:], idx, kind == MAXPOOL,
                                   1.0 if kind == MAXPOOL else 1.0 / (win * win), key0 + t * n_ops + o, stamp,
                                   dense, ev_i[ooff:], ev_val[ooff:])
            elif kind == ADD:
                ma, mb, mo = ops[o, 1], ops[o, 4], ops[o, 2]
                a, b = maps[ma, M_OFF], maps[ma, M_OFF] + ev_cnt[ma]
                c, d = maps[mb, M_OFF], maps[mb, M_OFF] + ev_cnt[mb]
                ooff = maps[mo, M_OFF]
                ev_cnt[mo] = _add(ev_i[a:b], ev_val[a:b], ev_i[c:d], ev_val[c:d], key0 + t * n_ops + o, stamp,
                                  dense, ev_i[ooff:], ev_val[ooff:])


def workspace(sizes: np.ndarray, n_maps: int, n_chunks: int) -> tuple[np.ndarray, ...]:
    """Per-thread scratch, made once per engine and thread count: fresh arrays on every call
    would cost more page faults than a small network's whole inference at batch 1. The last
    array is each thread's stamp clock, so stamps never need clearing."""
    n_ev, big, n_v, n_s, n_pad = (int(v) for v in sizes)
    return (np.empty((n_chunks, n_ev), np.uint32), np.empty((n_chunks, n_ev), np.float64),
            np.zeros((n_chunks, n_maps), np.int64), np.zeros((n_chunks, big), np.float64),
            np.zeros((n_chunks, big), np.bool_), np.zeros((n_chunks, max(n_v, 1)), np.float64),
            np.zeros((n_chunks, max(n_s, 1)), np.float64), np.zeros((n_chunks, big), np.float64),
            np.full((n_chunks, big), -1, np.int64), np.zeros((n_chunks, n_pad), np.float64),
            np.zeros(n_chunks, np.int64))


@njit(**_JIT)
def _vote(out, groups, voted, logits):
    """out [T, K * groups] of one sample -> voted [T, K] (mean of each class's group), logits [K]
    (mean over T)."""
    t_steps, width = out.shape
    k = width // groups
    logits[:] = 0.0
    for t in range(t_steps):
        for c in range(k):
            s = 0.0
            for j in range(groups):
                s += out[t, c * groups + j]
            voted[t, c] = s / groups
            logits[c] += voted[t, c]
    for c in range(k):
        logits[c] /= t_steps


@njit(**_JIT)
def run_chunk(x, T, ops, lay, maps, ptr, idx, wts, wts32, bias, lbias, lbase, live, inv_taus, out, sops, rec,
              record, groups, voted, logits, lo, hi, c, ev_i, ev_val, ev_cnt, acc, spk, vstate, static, dense,
              stamp, xpad, clock):
    """Samples lo..hi-1 on this thread, with row c of each workspace array; each sample's vote
    (voted [T, N, K], logits [N, K]) right after it, while its output is in cache."""
    for n in range(lo, hi):
        ev_cnt[c, :] = 0
        _sample(x, n, T, clock[c], ops, lay, maps, ptr, idx, wts, wts32, bias, lbias, lbase, live, inv_taus,
                out, sops, rec, record, ev_i[c], ev_val[c], ev_cnt[c], acc[c], spk[c], vstate[c], static[c],
                dense[c], stamp[c], xpad[c])
        _vote(out[n], groups, voted[:, n], logits[n])
        clock[c] += T * ops.shape[0]


@njit(cache=True, parallel=True, fastmath=False, boundscheck=False)
def run_batch(x, T, ops, lay, maps, ptr, idx, wts, wts32, bias, lbias, lbase, live, inv_taus, out, sops, rec,
              record, groups, voted, logits, chunks, ev_i, ev_val, ev_cnt, acc, spk, vstate, static, dense, stamp,
              xpad, clock):
    """x [N, T_in, input size] float32/64 -> out [N, T, K * groups], sops [N, counted layers], rec,
    voted [T, N, K], logits [N, K].

    `chunks` + 1 boundaries split the samples among threads, chunk c using workspace row c
    (`workspace`). One chunk: call `run_chunk` directly, no thread start."""
    for c in prange(chunks.shape[0] - 1):
        run_chunk(x, T, ops, lay, maps, ptr, idx, wts, wts32, bias, lbias, lbase, live, inv_taus, out, sops, rec,
                  record, groups, voted, logits, chunks[c], chunks[c + 1], c, ev_i, ev_val, ev_cnt, acc, spk,
                  vstate, static, dense, stamp, xpad, clock)
