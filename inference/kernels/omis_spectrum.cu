// OMIS spectrum histogram kernels: omis-wdiff-v1 and omis-rbhist-v1 (defined in docs/spectrum.md).
//
// Contract
//   Inputs are two packed RGB uint8 images W and P of n pixels (3n bytes each, R G B order) and
//   an optional mask of n bytes (0 = excluded, anything else = included; NULL = no mask).
//   Every buffer starts on a 16-byte boundary (pycuda allocations and page-locked host memory
//   are page aligned; the host code never passes an offset pointer).
//   The output is 2 * n_bins int64 values, zeroed by the host before the launch:
//   out[0 .. n_bins) = hist, out[n_bins .. 2 n_bins) = count. N is sum(count), computed on the
//   host.  For omis-rbhist-v1, hist = h_W - h_P and count = h_W, as in the CPU backends.
//   Everything is integer arithmetic, so the result is bit-identical to the CPU backends.
//
// Design (the kernel must stream ~2x3 bytes per pixel at a large fraction of DRAM bandwidth)
//   * Vectorised loads: a thread takes a "group" of 16 consecutive pixels, i.e. 48 bytes per
//     image, read as three 128-bit loads (uint4, read-only path) per image plus one 128-bit load
//     of the mask.  Groups are walked with a grid-stride loop; the last n % 16 pixels (the
//     tail) are read byte by byte by the first threads of the grid.
//   * Byte extraction is resolved at compile time: the 16-pixel loop is fully unrolled, so every
//     channel is a shift-and-mask of a register.
//   * Bin index of omis-wdiff-v1: j = floor(a / b) with a = (num + den) * L <= 2.09e9 < 2^31 and
//     b = max(2 den, 1) <= 520200 < 2^24 (L <= 4000).  The quotient is estimated with a fast
//     float32 division (relative error ~1e-6, so the estimate is within +-1 of the true floor for
//     quotients up to L) and then corrected exactly with the int32 remainder r = a - q b:
//     q -= (r < 0), q += (r >= b).  No float result reaches the histogram unchecked, so the
//     index is exact for every input.  Then j = min(j, L - 1).  Valid pixels always have
//     den >= 1 (the parameters require t_low >= 1); b = max(2 den, 1) only keeps invalid
//     pixels, which are never counted, from dividing by zero.
//   * Run-length pre-aggregation: consecutive valid pixels of one thread that fall into the same
//     bin are summed in registers and flushed as one update when the bin changes.  Neighbouring
//     pixels of real images mostly share a bin, so this removes most shared-memory atomics and
//     with them the same-address conflicts between the lanes of a warp (smooth regions put all
//     lanes into one bin).
//   * Privatised histograms: each block keeps `copies` copies of (hist int32, count uint32) in
//     dynamic shared memory (one per warp when they fit) updated with native 32-bit shared
//     atomics; after the loop they are summed and flushed with one 64-bit global atomicAdd per
//     non-zero bin and block.  32 bits are enough because the host caps the pixels one block
//     sees (MAX_PIXELS_PER_BLOCK = 2^21 plus one grid-stride round): |sum w| <= 510 * 2.1e6.
//   * Global accumulation uses unsigned 64-bit atomicAdd of two's-complement values, which is
//     exact integer addition modulo 2^64, hence exact for every real total (never float atomics).
//
// Compile standalone (syntax and resource check, no GPU needed):
//   nvcc -std=c++17 -O3 -arch=compute_87 -ptx omis_spectrum.cu -o omis_spectrum.ptx
//   nvcc -std=c++17 -O3 -arch=sm_90 -cubin -Xptxas -v omis_spectrum.cu -o omis_spectrum.cubin

namespace omis {

constexpr int kGroupPixels = 16;  // pixels per thread per grid-stride step
constexpr int kGroupWords = 12;   // 16 pixels * 3 bytes / 4 bytes per word
constexpr int kBlockThreads = 256;

struct Config {
    long long n;      // pixels
    int n_bins;       // L for wdiff, 511 for rbhist
    int t_low;        // R + B >= t_low in both images
    int t_sat;        // every channel < t_sat in both images
    int copies;       // privatised histogram copies per block
};

struct Pixel {
    int rw, gw, bw, rp, gp, bp;
    bool in_mask;
};

// Pending update of one bin: `sum` goes to hist, `cnt` to count (when the run counts).
struct Run {
    int bin;
    int sum;
    int cnt;
};

struct SharedHist {
    int* hist;
    unsigned* count;
};

__device__ __forceinline__ void run_reset(Run& run) {
    run.bin = -1;
    run.sum = 0;
    run.cnt = 0;
}

__device__ __forceinline__ void run_flush(const SharedHist& h, const Run& run, bool counts) {
    if (run.cnt != 0) {
        atomicAdd(h.hist + run.bin, run.sum);
        if (counts) {
            atomicAdd(h.count + run.bin, static_cast<unsigned>(run.cnt));
        }
    }
}

__device__ __forceinline__ void run_add(const SharedHist& h, Run& run, int bin, int value,
                                        bool counts) {
    if (bin != run.bin) {
        run_flush(h, run, counts);
        run.bin = bin;
        run.sum = 0;
        run.cnt = 0;
    }
    run.sum += value;
    run.cnt += 1;
}

__device__ __forceinline__ int max3(int a, int b, int c) { return max(max(a, b), c); }

__device__ __forceinline__ bool is_valid(const Pixel& x, const Config& cfg) {
    const int s_w = x.rw + x.bw;
    const int s_p = x.rp + x.bp;
    return x.in_mask & (s_w >= cfg.t_low) & (s_p >= cfg.t_low) &
           (max3(x.rw, x.gw, x.bw) < cfg.t_sat) & (max3(x.rp, x.gp, x.bp) < cfg.t_sat);
}

// floor(a / b) for 0 <= a < 2^31, 1 <= b < 2^24, a / b <= 4001: estimate, then exact fix-up.
__device__ __forceinline__ int floor_div_exact(int a, int b) {
    int q = __float2int_rz(__fdividef(__int2float_rn(a), __int2float_rn(b)));
    const int r = a - q * b;
    q += static_cast<int>(r >= b) - static_cast<int>(r < 0);
    return q;
}

struct Wdiff {
    Run run;

    __device__ __forceinline__ void init() { run_reset(run); }

    __device__ __forceinline__ void pixel(const Pixel& x, const Config& cfg,
                                          const SharedHist& h) {
        if (!is_valid(x, cfg)) {
            return;
        }
        const int s_w = x.rw + x.bw;
        const int s_p = x.rp + x.bp;
        const int num = x.rw * x.bp - x.rp * x.bw;
        const int den = s_w * s_p;
        const int a = (num + den) * cfg.n_bins;
        const int b = max(2 * den, 1);
        const int j = min(floor_div_exact(a, b), cfg.n_bins - 1);
        run_add(h, run, j, s_w - s_p, true);
    }

    __device__ __forceinline__ void finish(const SharedHist& h) { run_flush(h, run, true); }
};

// hist += 1 at d_W and -= 1 at d_P; count += 1 at d_W only: hist = h_W - h_P, count = h_W.
struct Rbhist {
    Run run_w;
    Run run_p;

    __device__ __forceinline__ void init() {
        run_reset(run_w);
        run_reset(run_p);
    }

    __device__ __forceinline__ void pixel(const Pixel& x, const Config& cfg,
                                          const SharedHist& h) {
        if (!is_valid(x, cfg)) {
            return;
        }
        run_add(h, run_w, x.rw - x.bw + 255, 1, true);
        run_add(h, run_p, x.rp - x.bp + 255, -1, false);
    }

    __device__ __forceinline__ void finish(const SharedHist& h) {
        run_flush(h, run_w, true);
        run_flush(h, run_p, false);
    }
};

__device__ __forceinline__ int byte_of(unsigned word, int k) {
    return static_cast<int>((word >> (8 * k)) & 0xFFu);
}

__device__ __forceinline__ void load_words(const unsigned char* base, long long group,
                                           unsigned (&words)[kGroupWords]) {
    const uint4* v = reinterpret_cast<const uint4*>(base) + 3 * group;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const uint4 q = __ldg(v + i);
        words[4 * i + 0] = q.x;
        words[4 * i + 1] = q.y;
        words[4 * i + 2] = q.z;
        words[4 * i + 3] = q.w;
    }
}

template <class Algo>
__device__ __forceinline__ void process_group(const unsigned char* w, const unsigned char* p,
                                              const unsigned char* mask, long long group,
                                              const Config& cfg, const SharedHist& h,
                                              Algo& algo) {
    unsigned ww[kGroupWords];
    unsigned pw[kGroupWords];
    load_words(w, group, ww);
    load_words(p, group, pw);
    uint4 m = make_uint4(~0u, ~0u, ~0u, ~0u);
    if (mask != nullptr) {
        m = __ldg(reinterpret_cast<const uint4*>(mask) + group);
    }
    const unsigned mw[4] = {m.x, m.y, m.z, m.w};
#pragma unroll
    for (int i = 0; i < kGroupPixels; ++i) {
        const int k = 3 * i;  // byte offset of the pixel's R inside the 48-byte group
        Pixel x;
        x.rw = byte_of(ww[k >> 2], k & 3);
        x.gw = byte_of(ww[(k + 1) >> 2], (k + 1) & 3);
        x.bw = byte_of(ww[(k + 2) >> 2], (k + 2) & 3);
        x.rp = byte_of(pw[k >> 2], k & 3);
        x.gp = byte_of(pw[(k + 1) >> 2], (k + 1) & 3);
        x.bp = byte_of(pw[(k + 2) >> 2], (k + 2) & 3);
        x.in_mask = byte_of(mw[i >> 2], i & 3) != 0;
        algo.pixel(x, cfg, h);
    }
}

template <class Algo>
__device__ __forceinline__ void process_tail_pixel(const unsigned char* w, const unsigned char* p,
                                                   const unsigned char* mask, long long i,
                                                   const Config& cfg, const SharedHist& h,
                                                   Algo& algo) {
    Pixel x;
    x.rw = w[3 * i];
    x.gw = w[3 * i + 1];
    x.bw = w[3 * i + 2];
    x.rp = p[3 * i];
    x.gp = p[3 * i + 1];
    x.bp = p[3 * i + 2];
    x.in_mask = mask == nullptr || mask[i] != 0;
    algo.pixel(x, cfg, h);
}

// Sum the block's copies of every bin and add them to the global int64 accumulators.
__device__ __forceinline__ void flush_block(const int* smem, const Config& cfg,
                                            unsigned long long* out) {
    const int stride = 2 * cfg.n_bins;
    for (int bin = threadIdx.x; bin < cfg.n_bins; bin += blockDim.x) {
        long long hist = 0;
        long long count = 0;
        for (int c = 0; c < cfg.copies; ++c) {
            hist += smem[c * stride + bin];
            count += static_cast<unsigned>(smem[c * stride + cfg.n_bins + bin]);
        }
        if (hist != 0) {
            atomicAdd(out + bin, static_cast<unsigned long long>(hist));
        }
        if (count != 0) {
            atomicAdd(out + cfg.n_bins + bin, static_cast<unsigned long long>(count));
        }
    }
}

template <class Algo>
__device__ __forceinline__ void spectrum_body(const unsigned char* __restrict__ w,
                                              const unsigned char* __restrict__ p,
                                              const unsigned char* __restrict__ mask,
                                              const Config& cfg,
                                              unsigned long long* __restrict__ out) {
    extern __shared__ int smem[];
    const int stride = 2 * cfg.n_bins;
    for (int i = threadIdx.x; i < stride * cfg.copies; i += blockDim.x) {
        smem[i] = 0;
    }
    __syncthreads();

    int* mine = smem + ((threadIdx.x >> 5) % cfg.copies) * stride;
    const SharedHist h{mine, reinterpret_cast<unsigned*>(mine + cfg.n_bins)};
    Algo algo;
    algo.init();

    const long long groups = cfg.n / kGroupPixels;
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long g = tid; g < groups; g += threads) {
        process_group(w, p, mask, g, cfg, h, algo);
    }
    const long long tail_start = groups * kGroupPixels;
    if (tid < cfg.n - tail_start) {
        process_tail_pixel(w, p, mask, tail_start + tid, cfg, h, algo);
    }
    algo.finish(h);
    __syncthreads();
    flush_block(smem, cfg, out);
}

}  // namespace omis

extern "C" __global__ void __launch_bounds__(omis::kBlockThreads)
    omis_wdiff_v1(const unsigned char* __restrict__ w, const unsigned char* __restrict__ p,
                  const unsigned char* __restrict__ mask, long long n, int n_bins, int t_low,
                  int t_sat, int copies, unsigned long long* __restrict__ out) {
    const omis::Config cfg{n, n_bins, t_low, t_sat, copies};
    omis::spectrum_body<omis::Wdiff>(w, p, mask, cfg, out);
}

extern "C" __global__ void __launch_bounds__(omis::kBlockThreads)
    omis_rbhist_v1(const unsigned char* __restrict__ w, const unsigned char* __restrict__ p,
                   const unsigned char* __restrict__ mask, long long n, int n_bins, int t_low,
                   int t_sat, int copies, unsigned long long* __restrict__ out) {
    const omis::Config cfg{n, n_bins, t_low, t_sat, copies};
    omis::spectrum_body<omis::Rbhist>(w, p, mask, cfg, out);
}
