// The forward of struct Kern<VB>: query rows [ia, ib) of one slice, two at a time (stage the key
// and value rows, logits, online softmax, P @ V, store out and lse).
// A section of struct Kern<VB> in na2d_cpu_simd.cpp, included inside its body (so it is
// compiled inside that file's x86-64 clones); not a header of its own.
#ifndef DCAL_NA2D_SIMD_KERN
#error "na2d_simd_fwd.h is a section of struct Kern in na2d_cpu_simd.cpp"
#endif

// Forward: query rows [ia, ib) of one slice, two at a time.

// The lane blocks' vectors o[b * D + d] of query row i -> dst (store_lanes per block). Into a map
// whose columns are contiguous (channels-first) head dim goes outer: each head dim's row of the
// map, a page of its own, is written whole before the next instead of one vector per head dim and
// lane block (the page walks of those scattered stores were a tenth of the forward kernel).
template <typename V, typename S>
DCAL_AI static void store_row(const V* o, int nbr, const Geo& g, const Slice& s, int i, const Out<S>& dst) {
  using T = std::remove_cvref_t<decltype(o[0][0])>;
  constexpr int L = Vec<T>::L;
  const int full = s.ny / L;
  int b = 0;
  if (int64_t{g.dil} * dst.sy == 1 && full > 1) {
    S* base = dst.p + offset(dst, g, s, i, 0);
    for (int64_t d = 0; d < g.D; ++d) {
      S* row = base + d * dst.sd;
      for (int bb = 0; bb < full; ++bb) storen<S, T>(row + bb * L, o[int64_t{bb} * g.D + d]);
    }
    b = full;
  }
  for (; b < nbr; ++b) store_lanes(o + int64_t{b} * g.D, std::min(L, s.ny - b * L), g, s, i, b * L, dst);
}

template <typename T, typename St>
DCAL_AI static void fwd_rows(const FwdArgs<T, St>& a, int64_t sl, int ia, int ib, Work<T>& w) {
  using V = vec_t<T>;
  constexpr int L = Vec<T>::L;
  const Geo& g = a.g;
  const Slice s = slice_of(g, sl);
  const int ks = g.ks, R = 2 * ks - 1, NC = 2 * ks - 1, nbr = (s.ny + L - 1) / L;
  const int64_t D = g.D, sblk = int64_t{w.nb} * ks * NC;
  const T* bias = a.rpb ? a.rpb + (s.bh % g.H) * R * R : nullptr;
  const V ninf = splat(-std::numeric_limits<T>::infinity());
  std::fill(w.slot.begin(), w.slot.end(), INT_MIN);
  w.windows(g, s);
  for (int i0 = ia; i0 < ib; i0 += kPair) {
    const Rows q = rows_of(w, g, s, i0, std::min(kPair, ib - i0));
    w.stage_rows(g, s, a.k, a.v, q.wsi[0], q.wsi[q.np - 1] + ks, [](int) {});
    for (int p = 0; p < q.np; ++p) stage(a.q, g, s, i0 + p, w.W, w.PAD, w.Qt.data() + p * w.row);
    V* S = w.S.data();
    pair_logits(w, q, ks, nbr, D, w.Qt.data(), w.Qt.data() + w.row, &Work<T>::krow, S, S + sblk);
    for (int p = 0; p < q.np; ++p) {
      const int i = i0 + p, wsi = q.wsi[p];
      T* lse = a.lse + s.bh * g.X * g.Y + (s.gx + int64_t{g.dil} * i) * g.Y + s.gy;
      for (int b = 0; b < nbr; ++b) {  // softmax of each lane: P, normalised, in place of S
        const int cmin = w.cmin[b], nc = w.nc[b];
        const mask_t<T>* valid = w.valid.data() + b * NC;
        V* Sb = S + p * sblk + int64_t{b} * ks * NC;
        V m = ninf;
        for (int t = 0; t < q.nu[p]; ++t) {
          const int u = q.us[p][t];
          const T* br = bias ? bias + (wsi + u - i + ks - 1) * R + (cmin + ks - 1) : nullptr;
          V* su = Sb + u * NC;
          for (int c = 0; c < nc; ++c) {
            V x = su[c] * a.scale;
            if (br) x += br[c];
            x = valid[c] ? x : ninf;
            su[c] = x;
            m = vmax<T>(m, x);
          }
        }
        V l{};
        for (int t = 0; t < q.nu[p]; ++t) {
          V* su = Sb + q.us[p][t] * NC;
          for (int c = 0; c < nc; ++c) {
            const V e = valid[c] ? vexp(su[c] - m) : V{};
            l += e;
            su[c] = e;
          }
        }
        const V inv = splat(T(1)) / l;  // lanes past the row: 1 / 0, never stored
        for (int t = 0; t < q.nu[p]; ++t) {
          V* su = Sb + q.us[p][t] * NC;
          for (int c = 0; c < nc; ++c) su[c] *= inv;
        }
        const int nl = std::min(L, s.ny - b * L);
        for (int ln = 0; ln < nl; ++ln) lse[int64_t{b * L + ln} * g.dil] = m[ln] + std::log(l[ln]);
      }
    }
    pair_wsum(w, q, ks, nbr, D, S, S + sblk, &Work<T>::vrow);
    for (int p = 0; p < q.np; ++p) store_row(w.o.data() + int64_t{p} * w.nb * D, nbr, g, s, i0 + p, a.out);
  }
}
