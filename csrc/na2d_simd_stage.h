// Slices, staging and the lanes' windows of struct Kern<VB>: a dilation slice's geometry, key and
// value rows staged transposed and zero-padded (with the finiteness probe), unstaging and lane
// stores, the column offsets of the lanes' windows, the per-thread work buffers (staging rings,
// accumulators) and the query-row pairs with their key rows.
// A section of struct Kern<VB> in na2d_cpu_simd.cpp, included inside its body (so it is
// compiled inside that file's x86-64 clones); not a header of its own.
#ifndef DCAL_NA2D_SIMD_KERN
#error "na2d_simd_stage.h is a section of struct Kern in na2d_cpu_simd.cpp"
#endif

// Slices, staging and the lanes' windows.

struct Slice {
  int64_t bh;
  int gx, gy, nx, ny;
};

DCAL_AI static Slice slice_of(const Geo& g, int64_t sl) {
  const int64_t dd = int64_t{g.dil} * g.dil;
  Slice s;
  s.bh = sl / dd;
  s.gx = static_cast<int>((sl % dd) / g.dil);
  s.gy = static_cast<int>(sl % g.dil);
  s.nx = na2d::subgrid_len(s.gx, static_cast<int>(g.X), g.dil);
  s.ny = na2d::subgrid_len(s.gy, static_cast<int>(g.Y), g.dil);
  return s;
}

// Element offset of slice position (r, c), head dim 0, in a tensor with strides t.
template <typename S>
DCAL_AI static int64_t offset(const S& t, const Geo& g, const Slice& s, int64_t r, int64_t c) {
  return (s.bh / g.H) * t.sb + (s.bh % g.H) * t.sh + (s.gx + g.dil * r) * t.sx + (s.gy + g.dil * c) * t.sy;
}

// Padding of a staged row on each side: the widest column offset plus one vector of lanes,
// rounded up to whole vectors, so a lane block's query vectors are aligned (the row stride W is a
// whole number of cache lines and the rows start on 64-byte boundaries).
DCAL_AI static int pad_of(int ks, int L) { return (ks - 1 + L + L - 1) / L * L; }

// dst [D][W] <- row r of the slice, transposed, columns at dst[PAD + c]; zeros off the map. The
// tensor's storage type S is widened to the compute type T here (S = T: a copy).
template <typename T, typename S>
DCAL_AI static void stage(const In<S>& t, const Geo& g, const Slice& s, int r, int64_t W, int PAD, T* dst) {
  const int64_t D = g.D, ny = s.ny;
  if (r < 0 || r >= s.nx) {
    std::fill(dst, dst + D * W, T(0));
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    std::fill(dst + d * W, dst + d * W + PAD, T(0));
    std::fill(dst + d * W + PAD + ny, dst + (d + 1) * W, T(0));
  }
  const S* src = t.p + offset(t, g, s, r, 0);
  const int64_t cs = int64_t{g.dil} * t.sy;
  constexpr int L = Vec<T>::L;
  if (t.sd != 1 && (cs == 1 || std::abs(cs) < std::abs(t.sd))) {  // columns closer than head dims
    for (int64_t d = 0; d < D; ++d) {
      const S* sd = src + d * t.sd;
      T* row = dst + d * W + PAD;
      if (cs == 1) {  // channels-first maps: each head dim's row is contiguous
        if constexpr (std::is_same_v<S, T>) {
          std::copy(sd, sd + ny, row);
        } else {
          int64_t c = 0;
          for (; c + L <= ny; c += L) storeu(row + c, loadw<T>(sd + c));
          for (; c < ny; ++c) row[c] = widen<T>(sd[c]);
        }
      } else {
        for (int64_t c = 0; c < ny; ++c) row[c] = widen<T>(sd[c * cs]);
      }
    }
  } else {
    int64_t c = 0;
    if (t.sd == 1)  // L tokens x L head dims at a time, transposed in registers
      for (; c + L <= ny; c += L) {
        int64_t d = 0;
        for (; d + L <= D; d += L) transpose_block(src + c * cs + d, cs, dst + d * W + PAD + c, W);
        for (; d < D; ++d)
          for (int l = 0; l < L; ++l) dst[d * W + PAD + c + l] = widen<T>(src[(c + l) * cs + d]);
      }
    for (; c < ny; ++c) {
      const S* e = src + c * cs;
      T* col = dst + PAD + c;
      for (int64_t d = 0; d < D; ++d) col[d * W] = widen<T>(e[d * t.sd]);
    }
  }
}

template <typename T>
DCAL_AI static bool finite(vec_t<T> probe) {
  bool ok = true;
  for (int l = 0; l < Vec<T>::L; ++l) ok &= probe[l] == 0;
  return ok;
}

// Sum of x - x over the columns of a staged row: 0 when every element is finite, NaN when one is
// an inf or a NaN (the padding is zeros; the row is in L1 right after staging).
template <typename T>
DCAL_AI static vec_t<T> probe_row(const T* dst, int64_t W, int64_t D, int PAD, int ny) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc{};
  for (int64_t d = 0; d < D; ++d)
    for (int c = 0; c < ny; c += L) {
      const vec_t<T> x = loadu(dst + d * W + PAD + c);
      acc += x - x;
    }
  return acc;
}

// Slice row r of dst <- a transposed [D][W] row (columns at src[PAD + c]), narrowed to dst's
// storage type S (S = T: a copy).
template <typename T, typename S>
DCAL_AI static void unstage(const T* src, const Geo& g, const Slice& s, int r, int64_t W, int PAD, const Out<S>& dst) {
  const int64_t D = g.D, ny = s.ny, cs = int64_t{g.dil} * dst.sy;
  constexpr int L = Vec<T>::L;
  S* base = dst.p + offset(dst, g, s, r, 0);
  if (dst.sd != 1 && (cs == 1 || std::abs(cs) < std::abs(dst.sd))) {
    for (int64_t d = 0; d < D; ++d) {
      const T* row = src + d * W + PAD;
      S* o = base + d * dst.sd;
      if (cs == 1) {
        if constexpr (std::is_same_v<S, T>) {
          std::copy(row, row + ny, o);
        } else {
          int64_t c = 0;
          for (; c + L <= ny; c += L) storen<S, T>(o + c, loadu(row + c));
          for (; c < ny; ++c) o[c] = narrow<S>(row[c]);
        }
      } else {
        for (int64_t c = 0; c < ny; ++c) o[c * cs] = narrow<S>(row[c]);
      }
    }
  } else {
    int64_t c = 0;
    if (dst.sd == 1)
      for (; c + L <= ny; c += L) {
        int64_t d = 0;
        for (; d + L <= D; d += L) transpose_block(src + d * W + PAD + c, W, base + c * cs + d, cs);
        for (; d < D; ++d)
          for (int l = 0; l < L; ++l) base[(c + l) * cs + d] = narrow<S>(src[d * W + PAD + c + l]);
      }
    for (; c < ny; ++c) {
      const T* col = src + PAD + c;
      S* o = base + c * cs;
      for (int64_t d = 0; d < D; ++d) o[d * dst.sd] = narrow<S>(col[d * W]);
    }
  }
}

// Lanes l < nl of the vectors o[d] (of T) -> queries (i, j0 + l) of dst, narrowed to its storage
// type S.
template <typename V, typename S>
DCAL_AI static void store_lanes(const V* o, int nl, const Geo& g, const Slice& s, int i, int j0, const Out<S>& dst) {
  using T = std::remove_cvref_t<decltype(o[0][0])>;
  S* base = dst.p + offset(dst, g, s, i, j0);
  const int64_t cs = int64_t{g.dil} * dst.sy;
  constexpr int L = Vec<T>::L;
  if (cs == 1 && nl == L) {
    for (int64_t d = 0; d < g.D; ++d) storen<S, T>(base + d * dst.sd, o[d]);
    return;
  }
  if (dst.sd == 1 && nl == L && g.D % L == 0) {
    for (int64_t d0 = 0; d0 < g.D; d0 += L) {
      vec_t<T> r[L];
      for (int l = 0; l < L; ++l) r[l] = o[d0 + l];
      transpose(r);
      for (int l = 0; l < L; ++l) storen<S, T>(base + l * cs + d0, r[l]);
    }
    return;
  }
  for (int l = 0; l < nl; ++l) {
    S* q = base + l * cs;
    for (int64_t d = 0; d < g.D; ++d) q[d * dst.sd] = narrow<S>(o[d][l]);
  }
}

// Column offsets (key column - query column) of the windows of queries ja .. jb (clipped to the
// slice): [*lo, *hi]. Centred windows (zero, mask) have the fixed offsets -ks/2 .. ks/2.
DCAL_AI static void offset_range(int ja, int jb, int ny, int ks, int border, int* lo, int* hi) {
  if (border != kClamp) {
    *lo = -(ks / 2);
    *hi = ks / 2;
    return;
  }
  ja = std::max(ja, 0);
  jb = std::min(jb, ny - 1);
  int a = INT_MAX, b = INT_MIN;
  for (int j = ja; j <= jb; ++j) {
    const int o = window_start(j, ny, ks, border) - j;
    a = std::min(a, o);
    b = std::max(b, o + ks - 1);
  }
  *lo = a;
  *hi = b;
}

// The window's column offsets for the lanes of queries j0 .. j0 + nl - 1: *cmin and *nc (their
// union) and, per offset, which lanes it belongs to (clamp windows differ near the borders; mask
// mode leaves off-map keys out; lanes >= nl belong to no query).
template <typename T>
DCAL_AI static void lane_windows(int j0, int nl, int ny, int ks, int border, int* cmin, int* nc, mask_t<T>* valid) {
  constexpr int L = Vec<T>::L;
  int lo, hi;
  offset_range(j0, j0 + nl - 1, ny, ks, border, &lo, &hi);
  *cmin = lo;
  *nc = hi - lo + 1;
  int off[L];
  for (int l = 0; l < nl; ++l) off[l] = window_start(j0 + l, ny, ks, border) - (j0 + l);
  for (int c = 0; c < *nc; ++c) {
    mask_t<T> m{};
    const int oc = lo + c;
    for (int l = 0; l < nl; ++l) {
      const int key = j0 + l + oc;
      const bool in = oc >= off[l] && oc < off[l] + ks && (border != kMask || (key >= 0 && key < ny));
      m[l] = in ? -1 : 0;
    }
    valid[c] = m;
  }
}

// Query rows go in pairs (kPair); the key ring holds the union of a pair's windows.
static constexpr int kPair = 2;

// A key row of a pair's windows: r and its window row for query row 0 and 1 (u0, u1; -1 where
// that query row does not take r).
struct KeyRow {
  int r, u0, u1;
};

// Per-thread buffers, sized for the widest slice. Everything that runs per element is always
// inline, so it is compiled inside the x86-64 clones of fwd_tasks / bwd_tasks.
template <typename T>
struct Work {
  int64_t W, row;                // row: one staged [D][W] row
  int PAD, nb, RK;               // nb: lane blocks of the widest slice row; RK: ring slots
  AlignedBuf<T> K, V, Qt, dOt;   // K, V: ring of RK transposed rows; Qt, dOt: the pair's rows
  AlignedBuf<T> dK, dV;          // backward: ring of transposed key-row gradient accumulators
  AlignedBuf<T> P, dS;           // backward: [kPair][ks][NCR][W] rows of P and scale * dS of the pair,
                                 // each query's value at its KEY's column (query column + offset)
  std::vector<T> delta, lse;     // backward: [W] per query column, one query row
  std::vector<T> wide;           // backward: [2D] a query's dO and out widened (narrower storage types)
  int coff, NCR;                 // column offsets -coff .. coff kept in the rows of P and dS
  AlignedBuf<vec_t<T>> S, dP;    // [kPair][nb][ks][2ks-1] logit-shaped vectors of the pair
  AlignedBuf<vec_t<T>> o, bias;  // o: [kPair][nb][D] output-shaped vectors; bias: [2ks-1]^2 sums
  AlignedBuf<mask_t<T>> valid;   // [nb][2ks-1] lanes of each block's column offsets
  std::vector<int> cmin, nc;     // [nb] first column offset and offset count of each block
  std::vector<const T*> wp, bp;
  std::vector<int> slot, us;  // ring slot -> key row; [kPair][ks] window rows taken
  std::vector<KeyRow> keys;   // [ks + kPair - 1] key rows of a pair's windows
  vec_t<T> probe{};           // finiteness probe (probe_row): of v in the forward, of every input in the
                              // backward (a non-finite q or k reaches only its own windows' logits)
  bool backward;
  std::vector<int> klo, khi;  // [nb] column offsets reaching each key block (backward)

  Work(const Geo& g, bool backward_) : backward(backward_) {
    constexpr int L = Vec<T>::L;
    const int ks = g.ks, NC = 2 * ks - 1;
    PAD = pad_of(ks, L);
    RK = ks + kPair - 1;
    coff = g.border == kClamp ? ks - 1 : ks / 2;  // centred windows never leave -ks/2 .. ks/2
    NCR = 2 * coff + 1;
    const int64_t ny_max = na2d::subgrid_len(0, static_cast<int>(g.Y), g.dil);
    nb = static_cast<int>((ny_max + L - 1) / L);
    // Row stride: whole cache lines, an odd number of them, so the D rows of a staged block spread
    // over every set of the L1 instead of aliasing into a few (a power-of-two stride would).
    constexpr int64_t kLine = 64 / sizeof(T);
    W = (ny_max + 2 * PAD + kLine - 1) / kLine * kLine;
    if ((W / kLine) % 2 == 0) W += kLine;
    row = g.D * W;
    K.resize(RK * row);
    V.resize(RK * row);
    Qt.resize(kPair * row);
    S.resize(int64_t{kPair} * nb * ks * NC);
    o.resize(int64_t{kPair} * nb * g.D);
    valid.resize(nb * NC);
    cmin.resize(nb);
    nc.resize(nb);
    slot.assign(RK, INT_MIN);
    us.resize(kPair * ks);
    keys.resize(RK);
    klo.resize(nb);
    khi.resize(nb);
    if (backward) {
      dOt.resize(kPair * row);
      dP.resize(int64_t{kPair} * nb * ks * NC);
      dK.resize(RK * row);
      dV.resize(RK * row);
      P.resize(int64_t{kPair} * ks * NCR * W);
      dS.resize(int64_t{kPair} * ks * NCR * W);
      delta.resize(W);
      wide.resize(2 * g.D);
      lse.resize(W);
      bias.resize(NC * NC);
      wp.resize(kPair * NC);
      bp.resize(kPair * NC);
    }
  }

  DCAL_AI int slot_of(int r) const { return ((r % RK) + RK) % RK; }
  DCAL_AI const T* krow(int r) const { return K.data() + slot_of(r) * row + PAD; }
  DCAL_AI const T* vrow(int r) const { return V.data() + slot_of(r) * row + PAD; }

  // The lane blocks' windows of a slice row (the same for every row of the slice), and the column
  // offsets through which queries reach each block of keys (the backward's dK, dV gather).
  DCAL_AI void windows(const Geo& g, const Slice& s) {
    constexpr int L = Vec<T>::L;
    const int ks = g.ks, NC = 2 * ks - 1;
    for (int b = 0; b * L < s.ny; ++b) {
      const int j0 = b * L;
      lane_windows<T>(j0, std::min(L, s.ny - j0), s.ny, ks, g.border, &cmin[b], &nc[b], valid.data() + b * NC);
      offset_range(j0 - (ks - 1), j0 + L - 1 + (ks - 1), s.ny, ks, g.border, &klo[b], &khi[b]);
    }
  }

  // Stage key rows lo .. hi - 1 into the ring (those not already there); evict(slot) runs first
  // on a slot whose row is replaced.
  template <typename S, typename Evict>
  DCAL_AI void stage_rows(const Geo& g, const Slice& s, const In<S>& k, const In<S>& v, int lo, int hi, Evict evict) {
    for (int r = lo; r < hi; ++r) {
      const int sl = slot_of(r);
      if (slot[sl] == r) continue;
      if (slot[sl] != INT_MIN) evict(sl);
      stage(k, g, s, r, W, PAD, K.data() + sl * row);
      stage(v, g, s, r, W, PAD, V.data() + sl * row);
      probe += probe_row(V.data() + sl * row, W, g.D, PAD, s.ny);
      if (backward) probe += probe_row(K.data() + sl * row, W, g.D, PAD, s.ny);
      slot[sl] = r;
    }
  }
};

// The np (1 or 2) query rows i0, i0 + 1 of a step: their window starts and the window rows each
// takes (mask mode leaves off-map rows out).
struct Rows {
  int np, wsi[kPair], nu[kPair];
  const int* us[kPair];
  int nk;  // the key rows of the union of the windows that either query row takes
  const KeyRow* keys;
};

template <typename T>
DCAL_AI static Rows rows_of(Work<T>& w, const Geo& g, const Slice& s, int i0, int np) {
  Rows q;
  q.np = np;
  for (int p = 0; p < np; ++p) {
    q.wsi[p] = window_start(i0 + p, s.nx, g.ks, g.border);
    int* us = w.us.data() + p * g.ks;
    q.nu[p] = 0;
    for (int u = 0; u < g.ks; ++u) {
      const int r = q.wsi[p] + u;
      if (g.border != kMask || (r >= 0 && r < s.nx)) us[q.nu[p]++] = u;
    }
    q.us[p] = us;
  }
  q.nk = 0;
  KeyRow* keys = w.keys.data();
  for (int r = q.wsi[0]; r < q.wsi[np - 1] + g.ks; ++r) {
    int u[kPair] = {-1, -1};
    for (int p = 0; p < np; ++p)
      if (std::find(q.us[p], q.us[p] + q.nu[p], r - q.wsi[p]) != q.us[p] + q.nu[p]) u[p] = r - q.wsi[p];
    if (u[0] >= 0 || u[1] >= 0) keys[q.nk++] = {r, u[0], u[1]};
  }
  q.keys = keys;
  return q;
}
