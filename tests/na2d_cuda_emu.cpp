// The CUDA kernels of csrc/na2d_kernels.cuh run on the CPU (float32), for
// tests/test_na2d_cpp.py::test_cuda_kernels_emulated: g++ compiles the kernel header unchanged
// with the CUDA keywords defined away; every thread of a block is a ucontext, blocks run one
// after another, and __shfl_xor_sync / __syncthreads are cooperative yields. This proves the
// kernels' index arithmetic (strides, dilation, inverse windows, bias entries, token numbers)
// where no GPU runs them; the GPU twins of the tests check the rest.
#include <functional>
#include <vector>
#include <cstdint>
#include <ucontext.h>

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
EmuDim3 threadIdx, blockIdx;  // set by the scheduler before it resumes a lane
// Cooperative lanes: every lane of a block is a ucontext; a shuffle writes its slot, yields,
// reads its partner's slot, yields. Lanes of one group run the same code, so after each round
// of the scheduler they stand at the same point (the lockstep a warp gives).
static ucontext_t g_sched, g_lane[128];
static float g_slot[128];
static int g_sync = 0;
static inline void emu_yield() { swapcontext(&g_lane[threadIdx.x], &g_sched); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(a, b)
#define __shared__ static
inline float __shfl_xor_sync(unsigned, float x, int off) {
  const int t = threadIdx.x;
  g_slot[t] = x;
  emu_yield();
  const float y = g_slot[t ^ off];
  emu_yield();
  return y;
}
inline void __syncthreads() {  // one per kernel (drpb), reached by all 128 lanes
  ++g_sync;
  while (g_sync < 128) emu_yield();
}

#include "na2d_kernels.cuh"

using namespace dcal::na2d_cuda;

static std::function<void()> g_kernel;
static bool g_done[128];
static void lane_entry(int t) {
  g_kernel();
  g_done[t] = true;
  // returning resumes uc_link (the scheduler)
}

template <typename K>
void run(unsigned gx, unsigned gy, K kernel) {
  static std::vector<char> stacks(128 * (1 << 16));
  g_kernel = kernel;
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      g_sync = 0;
      for (int t = 0; t < 128; ++t) {
        g_done[t] = false;
        getcontext(&g_lane[t]);
        g_lane[t].uc_stack.ss_sp = stacks.data() + (size_t)t * (1 << 16);
        g_lane[t].uc_stack.ss_size = 1 << 16;
        g_lane[t].uc_link = &g_sched;
        makecontext(&g_lane[t], (void (*)())lane_entry, 1, t);
      }
      blockIdx.x = bx;
      blockIdx.y = by;
      for (bool live = true; live;) {
        live = false;
        for (int t = 0; t < 128; ++t) {
          if (g_done[t]) continue;
          threadIdx.x = t;
          swapcontext(&g_sched, &g_lane[t]);
          live = true;
        }
      }
    }
}

static Strides st(const int64_t* s) { return Strides{s[0], s[1], s[2], s[3], s[4]}; }

static Params<float> params(const int* geo, float scale, const float* q, const int64_t* sq, const float* k,
                            const int64_t* sk, const float* v, const int64_t* sv, const float* rpb) {
  Params<float> p{};
  p.B = geo[0]; p.H = geo[1]; p.X = geo[2]; p.Y = geo[3]; p.D = geo[4]; p.ks = geo[5]; p.border = geo[6]; p.dil = geo[7];
  p.scale = scale;
  p.q = q; p.k = k; p.v = v; p.rpb = rpb;
  p.sq = st(sq); p.sk = st(sk); p.sv = st(sv);
  return p;
}

template <int kD, bool kR, bool kU>
void fwd_t(Params<float> p) {
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  run((n + kItems - 1) / kItems, 1, [&] { na2d_fwd_kernel<float, kD, kR, kU>(p); });
}
template <int kD, bool kR, bool kU>
void bwd_t(Params<float> p) {
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  run((n + kItems - 1) / kItems, 1, [&] { na2d_bwd_dq_kernel<float, kD, kR, kU>(p); });
  run((n + kItems - 1) / kItems, 1, [&] { na2d_bwd_dkdv_kernel<float, kD, kR, kU>(p); });
  if (kR) {
    const int R = 2 * p.ks - 1;
    run(R * R, p.H, [&] { na2d_bwd_drpb_kernel<float, kD, kU>(p); });
  }
}

// The host code's switches: head-dim bucket, bias, unit head-dim stride.
template <template <int, bool, bool> class F>
void launch(const Params<float>& p, bool rpb, bool unit) {
  auto pick = [&]<int kD>() {
    if (rpb) unit ? F<kD, true, true>::go(p) : F<kD, true, false>::go(p);
    else unit ? F<kD, false, true>::go(p) : F<kD, false, false>::go(p);
  };
  if (p.D <= 32) pick.template operator()<32>();
  else if (p.D <= 64) pick.template operator()<64>();
  else if (p.D <= 96) pick.template operator()<96>();
  else pick.template operator()<128>();
}
template <int kD, bool kR, bool kU>
struct Fwd { static void go(const Params<float>& p) { fwd_t<kD, kR, kU>(p); } };
template <int kD, bool kR, bool kU>
struct Bwd { static void go(const Params<float>& p) { bwd_t<kD, kR, kU>(p); } };

// Outputs are written through the strides given (so: out; sdq, sdk, sdv: the gradients), as the
// host code allocates them in the dim order of q, k, v.
extern "C" void emu_fwd(const int* geo, float scale, const float* q, const int64_t* sq, const float* k,
                        const int64_t* sk, const float* v, const int64_t* sv, const float* rpb, float* o,
                        const int64_t* so, float* lse) {
  Params<float> p = params(geo, scale, q, sq, k, sk, v, sv, rpb);
  p.o = o; p.sout = st(so); p.lse = lse;
  launch<Fwd>(p, rpb != nullptr, p.sq.d == 1 && p.sk.d == 1 && p.sv.d == 1 && p.sout.d == 1);
}

extern "C" void emu_bwd(const int* geo, float scale, const float* q, const int64_t* sq, const float* k,
                        const int64_t* sk, const float* v, const int64_t* sv, const float* rpb, const float* out,
                        const int64_t* so, const float* dout, const int64_t* sdo, const float* lse, float* delta,
                        float* dq, const int64_t* sdq, float* dk, const int64_t* sdk, float* dv, const int64_t* sdv,
                        float* drpb) {
  Params<float> p = params(geo, scale, q, sq, k, sk, v, sv, rpb);
  p.out = out; p.sout = st(so); p.dout = dout; p.sdo = st(sdo); p.lse = const_cast<float*>(lse); p.delta = delta;
  p.dq = dq; p.sdq = st(sdq); p.dk = dk; p.sdk = st(sdk); p.dv = dv; p.sdv = st(sdv); p.drpb = drpb;
  launch<Bwd>(p, rpb != nullptr, p.sq.d == 1 && p.sk.d == 1 && p.sv.d == 1 && p.sout.d == 1 && p.sdo.d == 1 &&
                                     p.sdq.d == 1 && p.sdk.d == 1 && p.sdv.d == 1);
}
