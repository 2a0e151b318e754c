// The backward of struct Kern<VB>: one whole slice, query rows two at a time (P from the logits and
// the forward's logsumexp, dS, dQ, the bias gradient, and the key-lane gather of dK and dV).
// A section of struct Kern<VB> in na2d_cpu_simd.cpp, included inside its body (so it is
// compiled inside that file's x86-64 clones); not a header of its own.
#ifndef DCAL_NA2D_SIMD_KERN
#error "na2d_simd_bwd.h is a section of struct Kern in na2d_cpu_simd.cpp"
#endif

// Backward: one whole slice, query rows two at a time. bwd_slice runs the phases below for each
// pair of query rows, in this order: enter key rows, logits, row statistics and scores per query
// row, dK/dV gather, dQ store; then it flushes the ring and sums the bias gradient.

// A key row leaves the ring at slot sl_: its dK, dV are complete.
template <typename T, typename St>
DCAL_AI static void bwd_flush(const BwdArgs<T, St>& a, const Slice& s, Work<T>& w, int sl_) {
  const int r = w.slot[sl_];
  if (r >= 0 && r < s.nx) {  // an off-map row of zero mode: its gradients are dropped
    unstage(w.dK.data() + sl_ * w.row, a.g, s, r, w.W, w.PAD, a.dk);
    unstage(w.dV.data() + sl_ * w.row, a.g, s, r, w.W, w.PAD, a.dv);
  }
}

// Enter key rows (staging): the key rows [lo, hi) of the pair's windows take ring slots (a row
// that leaves is flushed; an entering row's dK, dV accumulators are zeroed), K and V rows are
// staged, and the pair's Q and dO rows are staged and probed for non-finite values.
template <typename T, typename St>
DCAL_AI static void bwd_enter_rows(const BwdArgs<T, St>& a, const Slice& s, Work<T>& w, const Rows& q, int i0, int lo,
                                   int hi) {
  const Geo& g = a.g;
  const int PAD = w.PAD;
  const int64_t W = w.W, D = g.D, row = w.row;
  for (int r = lo; r < hi; ++r) {  // key rows entering the ring: zeroed accumulators
    const int sl_ = w.slot_of(r);
    if (w.slot[sl_] == r) continue;
    if (w.slot[sl_] != INT_MIN) bwd_flush(a, s, w, sl_);
    w.slot[sl_] = INT_MIN;
    std::fill(w.dK.data() + sl_ * row, w.dK.data() + (sl_ + 1) * row, T(0));
    std::fill(w.dV.data() + sl_ * row, w.dV.data() + (sl_ + 1) * row, T(0));
  }
  w.stage_rows(g, s, a.k, a.v, lo, hi, [](int) {});
  for (int p = 0; p < q.np; ++p) {
    stage(a.q, g, s, i0 + p, W, PAD, w.Qt.data() + p * row);
    stage(a.dout, g, s, i0 + p, W, PAD, w.dOt.data() + p * row);
    w.probe += probe_row(w.Qt.data() + p * row, W, D, PAD, s.ny) + probe_row(w.dOt.data() + p * row, W, D, PAD, s.ny);
  }
}

// Row statistics of query row i (slot p of the pair): the forward's logsumexp and delta =
// rowsum(dO * O) per query column into w.lse, w.delta (at PAD); a non-finite out or dout makes its
// query's delta non-finite, which the probe records.
template <typename T, typename St>
DCAL_AI static void bwd_row_stats(const BwdArgs<T, St>& a, const Slice& s, Work<T>& w, int p, int i) {
  const Geo& g = a.g;
  const int PAD = w.PAD;
  const int64_t W = w.W, D = g.D, row = w.row;
  const St* od = a.out.p + offset(a.out, g, s, i, 0);
  const St* dd = a.dout.p + offset(a.dout, g, s, i, 0);
  const int64_t co = int64_t{g.dil} * a.out.sy, cd = int64_t{g.dil} * a.dout.sy;
  const T* lr = a.lse + s.bh * g.X * g.Y + (s.gx + int64_t{g.dil} * i) * g.Y + s.gy;
  for (int j = 0; j < s.ny; ++j) w.lse[PAD + j] = lr[int64_t{j} * g.dil];
  T* dl = w.delta.data() + PAD;
  if (a.out.sd == 1 && a.dout.sd == 1) {  // token-major: one contiguous dot per query
    if constexpr (std::is_same_v<St, T>) {
      for (int j = 0; j < s.ny; ++j) dl[j] = cpu::dot_impl(dd + j * cd, od + j * co, D);
    } else {  // the same dot on the query's two vectors widened
      T* dw = w.wide.data();
      T* ow = dw + D;
      for (int j = 0; j < s.ny; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          dw[d] = widen<T>(dd[j * cd + d]);
          ow[d] = widen<T>(od[j * co + d]);
        }
        dl[j] = cpu::dot_impl(dw, ow, D);
      }
    }
  } else {  // head-dim-major (channels-first): sweep the map row once per head dim, dO staged
    std::fill(dl, dl + s.ny, T(0));
    const T* dos = w.dOt.data() + p * row + PAD;
    for (int64_t d = 0; d < D; ++d) {
      const T* a_ = dos + d * W;
      const St* b_ = od + d * a.out.sd;
      if (co == 1) {  // contiguous: the loop vectorises
        for (int j = 0; j < s.ny; ++j) dl[j] += a_[j] * widen<T>(b_[j]);
      } else {
        for (int j = 0; j < s.ny; ++j) dl[j] += a_[j] * widen<T>(b_[j * co]);
      }
    }
  }
  T dprobe = 0;  // an inf or a NaN of out (or of dout) makes its query's delta non-finite
  for (int j = 0; j < s.ny; ++j) dprobe += dl[j] - dl[j];
  w.probe += dprobe;
}

// Probabilities and score gradients of query row i (slot p of the pair, window start wsi): P from
// the logits S and the logsumexp, dS = P * (dP - delta); P and scale * dS are kept as rows for the
// dK, dV gather, scale * dS replaces S (for dQ), and dS is summed into the bias gradient.
template <typename T, typename St>
DCAL_AI static void bwd_scores(const BwdArgs<T, St>& a, Work<T>& w, const Rows& q, const T* bias, int nbr, int p, int i,
                               int wsi, vec_t<T>* S, const vec_t<T>* dP) {
  using V = vec_t<T>;
  constexpr int L = Vec<T>::L;
  const int ks = a.g.ks, R = 2 * ks - 1, NC = 2 * ks - 1, PAD = w.PAD;
  const int64_t W = w.W, sblk = int64_t{w.nb} * ks * NC;
  const int64_t prow_n = int64_t{ks} * w.NCR * W;  // one query row's P (or dS) rows
  for (int b = 0; b < nbr; ++b) {                  // P and scale * dS, kept as rows for dK, dV; dS in place of S
    const int j0 = b * L, cmin = w.cmin[b], nc = w.nc[b];
    const mask_t<T>* valid = w.valid.data() + b * NC;
    const V lsev = loadu(w.lse.data() + PAD + j0), dlv = loadu(w.delta.data() + PAD + j0);
    for (int t = 0; t < q.nu[p]; ++t) {
      const int u = q.us[p][t];
      const int bi = wsi + u - i + ks - 1;
      const T* br = bias ? bias + bi * R + (cmin + ks - 1) : nullptr;
      V* su = S + p * sblk + (int64_t{b} * ks + u) * NC;
      const V* pu = dP + p * sblk + (int64_t{b} * ks + u) * NC;
      const int64_t ro = p * prow_n + (int64_t{u} * w.NCR + cmin + w.coff) * W + PAD + j0 + cmin;
      T* prow = w.P.data() + ro;  // offset cmin + c's row, at the key columns j0 + cmin + c + lane
      T* srow = w.dS.data() + ro;
      for (int c = 0; c < nc; ++c) {
        V x = su[c] * a.scale;
        if (br) x += br[c];
        const V pr = valid[c] ? vexp(x - lsev) : V{};
        const V ds = valid[c] ? pr * (pu[c] - dlv) : V{};
        if (bias) w.bias[bi * R + cmin + c + ks - 1] += ds;
        const V dss = ds * a.scale;
        storeu(prow + c * (W + 1), pr);
        storeu(srow + c * (W + 1), dss);
        su[c] = dss;
      }
    }
  }
}

// The key-lane gather of one key block for a centred window of NC offsets (with_centred): dst
// (aligned, the block's column 0 of the key row's accumulators) += sum over the np query rows p
// taking the key row (window row us[p]) and offsets o of w_p[o] * rows_p shifted by -o, where w_p[o]
// is the P or dS row of (us[p], o) at the block's key columns (aligned) and the rows' shifted
// vectors come from aligned loads and shifts. Per accumulator the terms go in gather_n's order
// (query row, then offset), so the same bits.
template <typename T, int DB, int NC>
DCAL_AI static void gather_c(int np, const T* const* w, const T* const* b, int64_t W, int64_t d0, T* dst) {
  constexpr int H = NC / 2;
  vec_t<T> acc[DB];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) acc[e] = loadu(dst + (d0 + e) * W);
  for (int p = 0; p < np; ++p) {
    vec_t<T> x[NC];
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) x[c] = loadu(w[p] + c * W);
    const T* bp = b[p] + d0 * W;
#pragma GCC unroll 16
    for (int e = 0; e < DB; ++e) {
      vec_t<T> lo, mid, hi;
      around<T, NC>(bp + e * W, lo, mid, hi);
      unroll<NC>([&](auto c) DCAL_LAMBDA_AI { acc[e] += x[c] * shifted<T, H - decltype(c)::value>(lo, mid, hi); });
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) storeu(dst + (d0 + e) * W, acc[e]);
}

// dK/dV gather: dK, dV of the pair's key rows [lo, hi), keys in the lanes, from both query rows in
// one pass (rows off the map are dropped; a row outside one query row's window has zero P and dS
// there).
template <typename T>
DCAL_AI static void bwd_gather(const Slice& s, Work<T>& w, const Rows& q, int ks, int64_t D, int lo, int hi) {
  constexpr int L = Vec<T>::L;
  const int PAD = w.PAD;
  const int64_t W = w.W, row = w.row;
  const int64_t prow_n = int64_t{ks} * w.NCR * W;  // one query row's P (or dS) rows
  for (int r = std::max(lo, 0); r < std::min(hi, s.nx); ++r) {
    const int64_t ko = w.slot_of(r) * row;
    for (int k0 = 0; k0 < s.ny; k0 += L) {
      const int clo = w.klo[k0 / L], chi = w.khi[k0 / L];
      for (int which = 0; which < 2; ++which) {  // dK from dS and Q, dV from P and dO
        const T* src = which == 0 ? w.dS.data() : w.P.data();
        const T* rows = which == 0 ? w.Qt.data() : w.dOt.data();
        T* dst = (which == 0 ? w.dK.data() : w.dV.data()) + ko + PAD + k0;
        int np = 0;
        for (int p = 0; p < q.np; ++p) {
          const int u = r - q.wsi[p];
          if (u < 0 || u >= ks) continue;
          w.wp[np] = src + p * prow_n + (int64_t{u} * w.NCR + clo + w.coff) * W + PAD + k0;
          w.bp[np++] = rows + p * row + PAD + k0;
        }
        if (with_centred(clo, chi - clo + 1, [&](auto m) DCAL_LAMBDA_AI {
              constexpr int kDB = 8;
              for (int64_t d0 = 0; d0 < D; d0 += kDB)
                with_block<kDB>(D - d0, [&](auto k) DCAL_LAMBDA_AI {
                  gather_c<T, decltype(k)::value, decltype(m)::value>(np, w.wp.data(), w.bp.data(), W, d0, dst);
                });
            }))
          continue;
        int n = 0;
        for (int p = 0; p < q.np; ++p) {
          const int u = r - q.wsi[p];
          if (u < 0 || u >= ks) continue;
          for (int c = clo; c <= chi; ++c, ++n) {
            w.wp[n] = src + p * prow_n + (int64_t{u} * w.NCR + c + w.coff) * W + PAD + k0;
            w.bp[n] = rows + p * row + PAD + k0 - c;
          }
        }
        gather(n, w.wp.data(), w.bp.data(), W, D, dst);
      }
    }
  }
}

// dQ store: dQ = scale * dS @ K of the pair's query rows (S holds scale * dS), written to a.dq.
template <typename T, typename St>
DCAL_AI static void bwd_store_dq(const BwdArgs<T, St>& a, const Slice& s, Work<T>& w, const Rows& q, int nbr, int i0,
                                 vec_t<T>* S) {
  const int ks = a.g.ks, NC = 2 * ks - 1;
  const int64_t D = a.g.D, sblk = int64_t{w.nb} * ks * NC;
  pair_wsum(w, q, ks, nbr, D, S, S + sblk, &Work<T>::krow);  // dQ = scale * dS @ K
  for (int p = 0; p < q.np; ++p) store_row(w.o.data() + int64_t{p} * w.nb * D, nbr, a.g, s, i0 + p, a.dq);
}

template <typename T, typename St>
DCAL_AI static void bwd_slice(const BwdArgs<T, St>& a, int64_t sl, Work<T>& w) {
  using V = vec_t<T>;
  constexpr int L = Vec<T>::L;
  const Geo& g = a.g;
  const Slice s = slice_of(g, sl);
  const int ks = g.ks, R = 2 * ks - 1, NC = 2 * ks - 1, nbr = (s.ny + L - 1) / L;
  const int64_t D = g.D, row = w.row, sblk = int64_t{w.nb} * ks * NC;
  const T* bias = a.rpb ? a.rpb + (s.bh % g.H) * R * R : nullptr;
  std::fill(w.slot.begin(), w.slot.end(), INT_MIN);
  std::fill(w.bias.begin(), w.bias.end(), V{});
  std::fill(w.delta.begin(), w.delta.end(), T(0));
  std::fill(w.lse.begin(), w.lse.end(), T(0));
  w.windows(g, s);
  for (int i0 = 0; i0 < s.nx; i0 += kPair) {
    const Rows q = rows_of(w, g, s, i0, std::min(kPair, s.nx - i0));
    const int lo = q.wsi[0], hi = q.wsi[q.np - 1] + ks;
    bwd_enter_rows(a, s, w, q, i0, lo, hi);
    V* S = w.S.data();
    V* dP = w.dP.data();
    // Logits S = Q . K and dP = dO . V of both query rows.
    pair_logits(w, q, ks, nbr, D, w.Qt.data(), w.Qt.data() + row, &Work<T>::krow, S, S + sblk);
    pair_logits(w, q, ks, nbr, D, w.dOt.data(), w.dOt.data() + row, &Work<T>::vrow, dP, dP + sblk);
    std::fill(w.P.begin(), w.P.end(), T(0));
    std::fill(w.dS.begin(), w.dS.end(), T(0));
    for (int p = 0; p < q.np; ++p) {
      bwd_row_stats(a, s, w, p, i0 + p);
      bwd_scores(a, w, q, bias, nbr, p, i0 + p, q.wsi[p], S, dP);
    }
    bwd_gather(s, w, q, ks, D, lo, hi);
    bwd_store_dq(a, s, w, q, nbr, i0, S);
  }
  for (int sl_ = 0; sl_ < w.RK; ++sl_)
    if (w.slot[sl_] != INT_MIN) bwd_flush(a, s, w, sl_);
  if (a.bias_part) {  // the bias gradient of the slice: its lane accumulators summed
    T* bp = a.bias_part + sl * R * R;
    for (int e = 0; e < R * R; ++e) {
      T acc = 0;
      for (int l = 0; l < L; ++l) acc += w.bias[e][l];
      bp[e] = acc;
    }
  }
}
