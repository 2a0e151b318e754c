// The pair kernels of struct Kern<VB>: a query-row pair's logits and weighted sums (P @ V, dS @ K)
// over the key ring, each key row read once for both rows, built on the dot blocks.
// A section of struct Kern<VB> in na2d_cpu_simd.cpp, included inside its body (so it is
// compiled inside that file's x86-64 clones); not a header of its own.
#ifndef DCAL_NA2D_SIMD_KERN
#error "na2d_simd_pair.h is a section of struct Kern in na2d_cpu_simd.cpp"
#endif

// out_p[b][u][c] = sum_d A_p[d][b*L:] * B_r[d][b*L + cmin_b + c:] for the rows' lane blocks b and
// window rows u (key row r = wsi_p + u); a key row in both windows is read once for both, and
// stays in cache across the blocks. B_r: krow or vrow of the ring (member pointer).
template <typename T>
DCAL_AI static void pair_logits(Work<T>& w, const Rows& q, int ks, int nbr, int64_t D, const T* A0, const T* A1,
                                const T* (Work<T>::*B)(int) const, vec_t<T>* out0, vec_t<T>* out1) {
  constexpr int L = Vec<T>::L;
  const int NC = 2 * ks - 1, PAD = w.PAD;
  for (int b = 0; b < nbr; ++b) {  // lane block outer: its query vectors stay in L1 over the key rows
    for (int t = 0; t < q.nk; ++t) {
      const int u0 = q.keys[t].u0, u1 = q.keys[t].u1;
      const bool in0 = u0 >= 0, in1 = u1 >= 0;
      const T* br = (w.*B)(q.keys[t].r);
      const int64_t base = int64_t{b} * ks;
      const T *a0 = A0 + PAD + b * L, *a1 = A1 + PAD + b * L;
      vec_t<T>* o0 = in0 ? out0 + (base + u0) * NC : nullptr;
      vec_t<T>* o1 = in1 ? out1 + (base + u1) * NC : nullptr;
      if (with_centred(w.cmin[b], w.nc[b], [&](auto n) DCAL_LAMBDA_AI {
            constexpr int N = decltype(n)::value;
            if (in0 && in1)
              dots2_c<T, N>(a0, a1, br + b * L, w.W, D, o0, o1);
            else
              dots_c<T, N>(in0 ? a0 : a1, br + b * L, w.W, D, in0 ? o0 : o1);
          }))
        continue;
      const T* kb = br + b * L + w.cmin[b];
      if (in0 && in1)
        dots2(a0, a1, kb, w.W, D, w.nc[b], o0, o1);
      else
        dots(in0 ? a0 : a1, kb, w.W, D, w.nc[b], in0 ? o0 : o1);
    }
  }
}

// Lane block b, head dims d0 .. d0 + DB - 1 of o_p[b] (see pair_wsum): the accumulators stay in
// registers over every key row and column offset of the pair's windows; a shifted value vector
// loaded once serves both query rows where a key row is in both windows.
template <typename T, int DB>
DCAL_AI static void wsum_block(const Work<T>& w, const Rows& q, int ks, int b, int64_t d0, const vec_t<T>* wts0,
                               const vec_t<T>* wts1, const T* (Work<T>::*B)(int) const, vec_t<T>* o0, vec_t<T>* o1) {
  constexpr int L = Vec<T>::L;
  const int NC = 2 * ks - 1, n = w.nc[b];
  const int64_t W = w.W, base = int64_t{b} * ks;
  vec_t<T> acc0[DB], acc1[DB];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) acc0[e] = acc1[e] = vec_t<T>{};
  for (int t = 0; t < q.nk; ++t) {
    const int u0 = q.keys[t].u0, u1 = q.keys[t].u1;
    const T* vb = (w.*B)(q.keys[t].r) + b * L + w.cmin[b] + d0 * W;
    if (u0 >= 0 && u1 >= 0) {
      const vec_t<T>*x0 = wts0 + (base + u0) * NC, *x1 = wts1 + (base + u1) * NC;
      for (int c = 0; c < n; ++c) {
#pragma GCC unroll 16
        for (int e = 0; e < DB; ++e) {
          const vec_t<T> y = loadu(vb + c + e * W);
          acc0[e] += x0[c] * y;
          acc1[e] += x1[c] * y;
        }
      }
    } else {
      const vec_t<T>* x = u0 >= 0 ? wts0 + (base + u0) * NC : wts1 + (base + u1) * NC;
      vec_t<T>* acc = u0 >= 0 ? acc0 : acc1;
      for (int c = 0; c < n; ++c) {
#pragma GCC unroll 16
        for (int e = 0; e < DB; ++e) acc[e] += x[c] * loadu(vb + c + e * W);
      }
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) {
    o0[d0 + e] = acc0[e];
    o1[d0 + e] = acc1[e];
  }
}

// wsum_block for a centred window of NC offsets (with_centred): per key row the weights of every
// offset are held in registers and each head dim's shifted vectors come from three aligned loads
// (shifted()); the same sums in the same order per accumulator (key row, then offset), so the same
// bits.
template <typename T, int DB, int NC>
DCAL_AI static void wsum_block_c(const Work<T>& w, const Rows& q, int ks, int b, int64_t d0, const vec_t<T>* wts0,
                                 const vec_t<T>* wts1, const T* (Work<T>::*B)(int) const, vec_t<T>* o0, vec_t<T>* o1) {
  constexpr int L = Vec<T>::L, H = NC / 2;
  const int NCW = 2 * ks - 1;
  const int64_t W = w.W, base = int64_t{b} * ks;
  vec_t<T> acc0[DB], acc1[DB];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) acc0[e] = acc1[e] = vec_t<T>{};
  for (int t = 0; t < q.nk; ++t) {
    const int u0 = q.keys[t].u0, u1 = q.keys[t].u1;
    const T* vb = (w.*B)(q.keys[t].r) + b * L + d0 * W;
    if (u0 >= 0 && u1 >= 0) {
      vec_t<T> x0[NC], x1[NC];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        x0[c] = wts0[(base + u0) * NCW + c];
        x1[c] = wts1[(base + u1) * NCW + c];
      }
#pragma GCC unroll 16
      for (int e = 0; e < DB; ++e) {
        vec_t<T> lo, mid, hi;
        around<T, NC>(vb + e * W, lo, mid, hi);
        unroll<NC>([&](auto c) DCAL_LAMBDA_AI {
          const vec_t<T> y = shifted<T, decltype(c)::value - H>(lo, mid, hi);
          acc0[e] += x0[c] * y;
          acc1[e] += x1[c] * y;
        });
      }
    } else {
      const vec_t<T>* xs = u0 >= 0 ? wts0 + (base + u0) * NCW : wts1 + (base + u1) * NCW;
      vec_t<T>* acc = u0 >= 0 ? acc0 : acc1;
      vec_t<T> x[NC];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) x[c] = xs[c];
#pragma GCC unroll 16
      for (int e = 0; e < DB; ++e) {
        vec_t<T> lo, mid, hi;
        around<T, NC>(vb + e * W, lo, mid, hi);
        unroll<NC>([&](auto c) DCAL_LAMBDA_AI { acc[e] += x[c] * shifted<T, decltype(c)::value - H>(lo, mid, hi); });
      }
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) {
    o0[d0 + e] = acc0[e];
    o1[d0 + e] = acc1[e];
  }
}

// o_p[b][d] = sum_{u, c} wts_p[b][u][c] * B_r[d][b*L + cmin_b + c:] (P @ V, dS @ K) for the rows'
// lane blocks: per lane block, blocks of head dims accumulated in registers over all key rows.
template <typename T>
DCAL_AI static void pair_wsum(Work<T>& w, const Rows& q, int ks, int nbr, int64_t D, const vec_t<T>* wts0,
                              const vec_t<T>* wts1, const T* (Work<T>::*B)(int) const) {
  constexpr int kDB = VB == 64 ? 8 : 4;  // 2 * kDB accumulators: 16 of the 32 AVX-512 registers
  vec_t<T>* o0 = w.o.data();
  vec_t<T>* o1 = w.o.data() + int64_t{w.nb} * D;
  constexpr int kDBc = 4;  // the shifted path holds 2 * 7 weights and 2 * kDBc accumulators
  for (int b = 0; b < nbr; ++b) {
    if (with_centred(w.cmin[b], w.nc[b], [&](auto n) DCAL_LAMBDA_AI {
          for (int64_t d0 = 0; d0 < D; d0 += kDBc)
            with_block<kDBc>(D - d0, [&](auto k) DCAL_LAMBDA_AI {
              wsum_block_c<T, decltype(k)::value, decltype(n)::value>(w, q, ks, b, d0, wts0, wts1, B, o0 + b * D,
                                                                      o1 + b * D);
            });
        }))
      continue;
    for (int64_t d0 = 0; d0 < D; d0 += kDB)
      with_block<kDB>(D - d0, [&](auto k) DCAL_LAMBDA_AI {
        wsum_block<T, decltype(k)::value>(w, q, ks, b, d0, wts0, wts1, B, o0 + b * D, o1 + b * D);
      });
  }
}
