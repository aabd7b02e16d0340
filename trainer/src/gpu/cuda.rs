//! The CUDA executor of [`super::device::Device`]: the step's operations as our kernels (CUDA C
//! below, compiled at start by NVRTC for the device's architecture) and cuBLAS `sgemm`, one
//! stream per device; the dense gradients all-reduced with NCCL.
//!
//! The CUDA libraries are opened at run time (`cudarc`'s dynamic loading): every build and
//! every test works on machines without CUDA, and nothing here is called before
//! `rankd_engine::gpu::probe` found the driver, cuBLAS, NVRTC and a device.
//!
//! Kernel by kernel, the semantics are those of [`super::device::HostDevice`] (which the tests
//! compare with the CPU trainer everywhere): keep the two in step.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm as _, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nccl::{Comm, ReduceOp};

use super::device::{AdamStep, DResult, Device, DeviceError, Gemm, Head, Pool, Seg};

/// The device code: one thread per element, example, column or row, each kernel looping over its
/// items with a grid stride; a block per example for the pooling. Every reduction runs in a
/// fixed order (deterministic, as the host executor). No `<math.h>` under NVRTC: no `INFINITY`
/// (the C check of the tests declares only what NVRTC has).
pub const KERNELS: &str = r#"
extern "C" __global__ void tr_pool(float* __restrict__ x, const unsigned* __restrict__ offsets,
                                   const unsigned* __restrict__ ids,
                                   const float* __restrict__ table, unsigned n, unsigned width,
                                   unsigned col, unsigned dim, int mean) {
    unsigned b = blockIdx.x;
    if (b >= n) return;
    unsigned from = offsets[b], to = offsets[b + 1];
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
        float acc = 0.0f;
        for (unsigned i = from; i < to; ++i) acc += table[(unsigned long long)ids[i] * dim + j];
        if (mean && to - from > 1u) acc /= (float)(to - from);
        x[(unsigned long long)b * width + col + j] = acc;
    }
}

extern "C" __global__ void tr_set_col(float* __restrict__ x, const float* __restrict__ src,
                                      unsigned n, unsigned width, unsigned col) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        x[(unsigned long long)b * width + col] = src[b];
    }
}

extern "C" __global__ void tr_bias_act(float* __restrict__ h, const float* __restrict__ bias,
                                       unsigned n, unsigned out, int relu) {
    unsigned long long total = (unsigned long long)n * out;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = h[i] + bias[i % out];
        h[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

extern "C" __global__ void tr_add_rows(float* __restrict__ acc,
                                       const unsigned* __restrict__ offsets,
                                       const unsigned* __restrict__ ids,
                                       const float* __restrict__ w, unsigned n) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        float a = acc[b];
        for (unsigned i = offsets[b]; i < offsets[b + 1]; ++i) a += w[ids[i]];
        acc[b] = a;
    }
}

extern "C" __global__ void tr_copy_add(float* __restrict__ dst, const float* __restrict__ src,
                                       unsigned n, float add) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        dst[i] = src[i] + add;
    }
}

extern "C" __global__ void tr_add(float* __restrict__ dst, const float* __restrict__ src,
                                  unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        dst[i] += src[i];
    }
}

extern "C" __global__ void tr_fm_forward(float* __restrict__ logits, float* __restrict__ sum,
                                         const float* __restrict__ x,
                                         const unsigned* __restrict__ cols, unsigned n,
                                         unsigned width, unsigned fields, unsigned dim) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        float* s = sum + (unsigned long long)b * dim;
        for (unsigned d = 0; d < dim; ++d) s[d] = 0.0f;
        float sq = 0.0f;
        for (unsigned f = 0; f < fields; ++f) {
            const float* v = x + (unsigned long long)b * width + cols[f];
            for (unsigned d = 0; d < dim; ++d) {
                s[d] += v[d];
                sq += v[d] * v[d];
            }
        }
        float total = 0.0f;
        for (unsigned d = 0; d < dim; ++d) total += s[d] * s[d];
        logits[b] += 0.5f * (total - sq);
    }
}

extern "C" __global__ void tr_fm_backward(float* __restrict__ dx, const float* __restrict__ x,
                                          const float* __restrict__ sum,
                                          const float* __restrict__ dlogit,
                                          const unsigned* __restrict__ cols, unsigned n,
                                          unsigned width, unsigned fields, unsigned dim) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < (unsigned long long)n * dim; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned b = (unsigned)(i / dim), d = (unsigned)(i % dim);
        for (unsigned f = 0; f < fields; ++f) {
            unsigned long long at = (unsigned long long)b * width + cols[f] + d;
            dx[at] += dlogit[b] * (sum[i] - x[at]);
        }
    }
}

extern "C" __global__ void tr_loss_grad(const float* __restrict__ logits,
                                        const float* __restrict__ labels,
                                        float* __restrict__ dlogit, float* __restrict__ loss,
                                        unsigned n, unsigned stride, unsigned at, float w,
                                        float scale) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        float z = logits[b], y = labels[(unsigned long long)b * stride + at];
        if (isnan(y)) {
            loss[b] = 0.0f;
            dlogit[b] = 0.0f;
            continue;
        }
        loss[b] = w * (log1pf(expf(-fabsf(z))) + fmaxf(z, 0.0f) - y * z);
        float p;
        if (z >= 0.0f) {
            p = 1.0f / (1.0f + expf(-z));
        } else {
            float e = expf(z);
            p = e / (1.0f + e);
        }
        dlogit[b] = w * (p - y) * scale;
    }
}

extern "C" __global__ void tr_softmax_rows(float* __restrict__ x, unsigned n, unsigned k) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        float* row = x + (unsigned long long)b * k;
        float max = -__uint_as_float(0x7f800000u); /* -inf: NVRTC has no INFINITY */
        for (unsigned e = 0; e < k; ++e) max = fmaxf(max, row[e]);
        float sum = 0.0f;
        for (unsigned e = 0; e < k; ++e) {
            row[e] = expf(row[e] - max);
            sum += row[e];
        }
        for (unsigned e = 0; e < k; ++e) row[e] /= sum;
    }
}

extern "C" __global__ void tr_axpy_rows(float* __restrict__ dst, const float* __restrict__ p,
                                        const float* __restrict__ src, unsigned e, unsigned k,
                                        unsigned n, unsigned width) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < (unsigned long long)n * width; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned b = (unsigned)(i / width);
        dst[i] += p[(unsigned long long)b * k + e] * src[i];
    }
}

extern "C" __global__ void tr_row_dot(float* __restrict__ ds, const float* __restrict__ a,
                                      const float* __restrict__ c, unsigned e, unsigned k,
                                      unsigned n, unsigned width) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        const float* x = a + (unsigned long long)b * width;
        const float* y = c + (unsigned long long)b * width;
        float s = 0.0f;
        for (unsigned j = 0; j < width; ++j) s += x[j] * y[j];
        ds[(unsigned long long)b * k + e] = s;
    }
}

extern "C" __global__ void tr_softmax_back(float* __restrict__ da, const float* __restrict__ p,
                                           const float* __restrict__ ds, unsigned n,
                                           unsigned k) {
    for (unsigned b = blockIdx.x * blockDim.x + threadIdx.x; b < n;
         b += gridDim.x * blockDim.x) {
        const float* s = p + (unsigned long long)b * k;
        const float* d = ds + (unsigned long long)b * k;
        float mean = 0.0f;
        for (unsigned e = 0; e < k; ++e) mean += s[e] * d[e];
        for (unsigned e = 0; e < k; ++e) da[(unsigned long long)b * k + e] = s[e] * (d[e] - mean);
    }
}

extern "C" __global__ void tr_col_sum(const float* __restrict__ src, float* __restrict__ dst,
                                      unsigned n, unsigned width) {
    for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < width;
         o += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (unsigned b = 0; b < n; ++b) s += src[(unsigned long long)b * width + o];
        dst[o] = s;
    }
}

extern "C" __global__ void tr_relu_back(float* __restrict__ dz, const float* __restrict__ dh,
                                        const float* __restrict__ h, unsigned long long len,
                                        float keep) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < len; i += (unsigned long long)gridDim.x * blockDim.x) {
        dz[i] = h[i] > 0.0f ? dh[i] * keep : 0.0f;
    }
}

extern "C" __global__ void tr_mul(float* __restrict__ dst, const float* __restrict__ src,
                                  unsigned long long len) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < len; i += (unsigned long long)gridDim.x * blockDim.x) {
        dst[i] *= src[i];
    }
}

/* One thread per column: rows in order, as the host executor. */
extern "C" __global__ void tr_bn_forward(float* __restrict__ h, float* __restrict__ xhat,
                                         float* __restrict__ inv, float* __restrict__ stats,
                                         const float* __restrict__ gamma,
                                         const float* __restrict__ beta, unsigned n,
                                         unsigned out, float weight) {
    for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < out;
         o += gridDim.x * blockDim.x) {
        float mean = 0.0f;
        for (unsigned b = 0; b < n; ++b) mean += h[(unsigned long long)b * out + o];
        mean /= (float)n;
        float var = 0.0f;
        for (unsigned b = 0; b < n; ++b) {
            float d = h[(unsigned long long)b * out + o] - mean;
            var += d * d;
        }
        var /= (float)n;
        float iv = 1.0f / sqrtf(var + 1e-5f);
        inv[o] = iv;
        for (unsigned b = 0; b < n; ++b) {
            unsigned long long at = (unsigned long long)b * out + o;
            float xh = (h[at] - mean) * iv;
            xhat[at] = xh;
            h[at] = fmaxf(gamma[o] * xh + beta[o], 0.0f);
        }
        stats[o] = mean * weight;
        stats[out + o] = var * weight;
    }
}

extern "C" __global__ void tr_bn_backward(float* __restrict__ dz, const float* __restrict__ xhat,
                                          const float* __restrict__ inv,
                                          const float* __restrict__ gamma,
                                          float* __restrict__ dgamma, float* __restrict__ dbeta,
                                          unsigned n, unsigned out) {
    for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < out;
         o += gridDim.x * blockDim.x) {
        float dg = 0.0f, db = 0.0f, sum_dx = 0.0f, sum_dx_x = 0.0f;
        for (unsigned b = 0; b < n; ++b) {
            unsigned long long at = (unsigned long long)b * out + o;
            float dy = dz[at], xh = xhat[at];
            dg += dy * xh;
            db += dy;
            float dx = dy * gamma[o];
            sum_dx += dx;
            sum_dx_x += dx * xh;
        }
        dgamma[o] = dg;
        dbeta[o] = db;
        float nf = (float)n;
        for (unsigned b = 0; b < n; ++b) {
            unsigned long long at = (unsigned long long)b * out + o;
            float dx = dz[at] * gamma[o];
            dz[at] = inv[o] / nf * (nf * dx - sum_dx - xhat[at] * sum_dx_x);
        }
    }
}

extern "C" __global__ void tr_cross_mix(float* __restrict__ next, const float* __restrict__ xl,
                                        const float* __restrict__ x0,
                                        const float* __restrict__ t, unsigned long long len) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < len; i += (unsigned long long)gridDim.x * blockDim.x) {
        next[i] = xl[i] + x0[i] * t[i];
    }
}

extern "C" __global__ void tr_cross_back(float* __restrict__ dt, float* __restrict__ dx0,
                                         const float* __restrict__ g,
                                         const float* __restrict__ x0,
                                         const float* __restrict__ t, unsigned long long len) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < len; i += (unsigned long long)gridDim.x * blockDim.x) {
        dt[i] = g[i] * x0[i];
        dx0[i] += g[i] * t[i];
    }
}

extern "C" __global__ void tr_seg_reduce(float* __restrict__ out,
                                         const unsigned* __restrict__ offsets,
                                         const unsigned* __restrict__ ex,
                                         const float* __restrict__ scale,
                                         const float* __restrict__ src, unsigned rows,
                                         unsigned dim, unsigned width, unsigned col) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < (unsigned long long)rows * dim; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned u = (unsigned)(i / dim), d = (unsigned)(i % dim);
        float acc = 0.0f;
        for (unsigned j = offsets[u]; j < offsets[u + 1]; ++j) {
            acc += scale[j] * src[(unsigned long long)ex[j] * width + col + d];
        }
        out[i] = acc;
    }
}

extern "C" __global__ void tr_adam(float* __restrict__ w, const float* __restrict__ g,
                                   float* __restrict__ m, float* __restrict__ v,
                                   unsigned long long len, float c1, float c2, float lr,
                                   float l2) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < len; i += (unsigned long long)gridDim.x * blockDim.x) {
        float gi = g[i] + l2 * w[i];
        m[i] = 0.9f * m[i] + (1.0f - 0.9f) * gi;
        v[i] = 0.999f * v[i] + (1.0f - 0.999f) * gi * gi;
        w[i] -= lr * (m[i] / c1) / (sqrtf(v[i] / c2) + 1e-8f);
    }
}
"#;

/// Whether NCCL can be loaded (multi-GPU training needs it).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the shared library with `dlopen` (through libloading) and
    // closes it again; no symbol is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

struct Kernels {
    pool: CudaFunction,
    set_col: CudaFunction,
    bias_act: CudaFunction,
    add_rows: CudaFunction,
    copy_add: CudaFunction,
    add: CudaFunction,
    fm_forward: CudaFunction,
    fm_backward: CudaFunction,
    loss_grad: CudaFunction,
    softmax_rows: CudaFunction,
    axpy_rows: CudaFunction,
    row_dot: CudaFunction,
    softmax_back: CudaFunction,
    col_sum: CudaFunction,
    relu_back: CudaFunction,
    mul: CudaFunction,
    bn_forward: CudaFunction,
    bn_backward: CudaFunction,
    cross_mix: CudaFunction,
    cross_back: CudaFunction,
    seg_reduce: CudaFunction,
    adam: CudaFunction,
}

/// A GPU: its stream, cuBLAS handle, kernels and (with more than one GPU) NCCL communicator.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    comm: Option<Comm>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn driver(what: &str, e: DriverError) -> DeviceError {
    DeviceError(format!("{what}: {e:?}"))
}

/// Starts the GPUs `ordinals` (contexts, kernels, streams, cuBLAS; NCCL communicators when
/// there are several).
pub fn open(ordinals: &[usize]) -> DResult<Vec<CudaDevice>> {
    let mut devices = Vec::new();
    for &ordinal in ordinals {
        devices.push(open_one(ordinal)?);
    }
    if devices.len() > 1 {
        let streams = devices.iter().map(|d| d.stream.clone()).collect();
        let comms = Comm::from_devices(streams)
            .map_err(|e| DeviceError(format!("NCCL communicators: {e:?}")))?;
        for (d, c) in devices.iter_mut().zip(comms) {
            d.comm = Some(c);
        }
    }
    Ok(devices)
}

fn open_one(ordinal: usize) -> DResult<CudaDevice> {
    let start = |what: &str, e: DriverError| driver(&format!("GPU {ordinal}: {what}"), e);
    let ctx = CudaContext::new(ordinal).map_err(|e| start("context", e))?;
    let name = format!(
        "cuda:{ordinal} ({})",
        ctx.name().unwrap_or_else(|_| "unknown".into())
    );
    let module = rankd_engine::gpu::cuda::load_kernels(&ctx, KERNELS)
        .map_err(|e| DeviceError(format!("GPU {ordinal}: {e}")))?;
    let f = |n: &str| module.load_function(n).map_err(|e| start(n, e));
    let k = Kernels {
        pool: f("tr_pool")?,
        set_col: f("tr_set_col")?,
        bias_act: f("tr_bias_act")?,
        add_rows: f("tr_add_rows")?,
        copy_add: f("tr_copy_add")?,
        add: f("tr_add")?,
        fm_forward: f("tr_fm_forward")?,
        fm_backward: f("tr_fm_backward")?,
        loss_grad: f("tr_loss_grad")?,
        softmax_rows: f("tr_softmax_rows")?,
        axpy_rows: f("tr_axpy_rows")?,
        row_dot: f("tr_row_dot")?,
        softmax_back: f("tr_softmax_back")?,
        col_sum: f("tr_col_sum")?,
        relu_back: f("tr_relu_back")?,
        mul: f("tr_mul")?,
        bn_forward: f("tr_bn_forward")?,
        bn_backward: f("tr_bn_backward")?,
        cross_mix: f("tr_cross_mix")?,
        cross_back: f("tr_cross_back")?,
        seg_reduce: f("tr_seg_reduce")?,
        adam: f("tr_adam")?,
    };
    let stream = ctx.new_stream().map_err(|e| start("stream", e))?;
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| DeviceError(format!("GPU {ordinal}: cuBLAS: {e:?}")))?;
    Ok(CudaDevice {
        ordinal,
        name,
        stream,
        blas,
        k,
        comm: None,
    })
}

/// One thread per item, 256 per block, at most 65,535 blocks (every kernel launched with it
/// loops over its items with a grid stride).
fn per_item(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of a kernel with the arguments pushed by `args`.
macro_rules! launch {
    ($dev:expr, $f:ident, $cfg:expr, $what:literal, |$b:ident| $args:block) => {{
        let mut $b = $dev.stream.launch_builder(&$dev.k.$f);
        $args
        // SAFETY: the arguments match the kernel's parameters in number, order and type, and
        // every buffer was sized by the replica for the counts passed with it.
        unsafe { $b.launch($cfg) }.map_err(|e| driver($what, e))?;
        Ok(())
    }};
}

fn u(n: usize) -> u32 {
    debug_assert!(
        u32::try_from(n).is_ok(),
        "{n} does not fit the kernels' 32-bit counts"
    );
    n as u32
}

impl Device for CudaDevice {
    type F = CudaSlice<f32>;
    type U = CudaSlice<u32>;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn zeros(&mut self, len: usize) -> DResult<CudaSlice<f32>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| driver("alloc", e))
    }

    fn words(&mut self) -> DResult<CudaSlice<u32>> {
        self.stream.alloc_zeros(1).map_err(|e| driver("alloc", e))
    }

    fn put(&mut self, dst: &mut CudaSlice<f32>, src: &[f32]) -> DResult {
        if src.is_empty() {
            return Ok(());
        }
        self.ensure(dst, src.len())?;
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .map_err(|e| driver("upload", e))
    }

    fn put_u32(&mut self, dst: &mut CudaSlice<u32>, src: &[u32]) -> DResult {
        if src.is_empty() {
            return Ok(());
        }
        if dst.len() < src.len() {
            *dst = self
                .stream
                .alloc_zeros(src.len().next_power_of_two())
                .map_err(|e| driver("alloc", e))?;
        }
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .map_err(|e| driver("upload", e))
    }

    fn ensure(&mut self, buf: &mut CudaSlice<f32>, len: usize) -> DResult {
        if buf.len() < len {
            *buf = self
                .stream
                .alloc_zeros(len.next_power_of_two())
                .map_err(|e| driver("alloc", e))?;
        }
        Ok(())
    }

    fn get(&mut self, src: &CudaSlice<f32>, out: &mut [f32]) -> DResult {
        if out.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtoh(&src.slice(..out.len()), out)
            .map_err(|e| driver("download", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver("synchronize", e))
    }

    fn zero(&mut self, buf: &mut CudaSlice<f32>, len: usize) -> DResult {
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memset_zeros(&mut buf.slice_mut(..len))
            .map_err(|e| driver("memset", e))
    }

    fn gemm(
        &mut self,
        g: Gemm,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> DResult {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: B and A swap places.
        let cfg = GemmConfig {
            transa: op(g.tb),
            transb: op(g.ta),
            m: g.n as i32,
            n: g.m as i32,
            k: g.k as i32,
            alpha: 1.0f32,
            lda: g.ldb as i32,
            ldb: g.lda as i32,
            beta: g.beta,
            ldc: g.ldc as i32,
        };
        // SAFETY: the replica passes shapes and leading dimensions of buffers it sized for them
        // (checked against the host executor by the tests); C is a different buffer from A, B.
        unsafe { self.blas.gemm(cfg, b, a, c) }
            .map_err(|e| DeviceError(format!("cuBLAS sgemm: {e:?}")))
    }

    fn pool(
        &mut self,
        p: Pool,
        offsets: &CudaSlice<u32>,
        ids: &CudaSlice<u32>,
        table: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
    ) -> DResult {
        if p.n == 0 || p.dim == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (u(p.n), 1, 1),
            block_dim: (u(p.dim.next_multiple_of(32).min(256)), 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, width, col, dim, mean) = (u(p.n), u(p.width), u(p.col), u(p.dim), p.mean as i32);
        launch!(self, pool, cfg, "pool", |b| {
            b.arg(x).arg(offsets).arg(ids).arg(table);
            b.arg(&n).arg(&width).arg(&col).arg(&dim).arg(&mean);
        })
    }

    fn set_col(
        &mut self,
        x: &mut CudaSlice<f32>,
        n: usize,
        width: usize,
        col: usize,
        src: &CudaSlice<f32>,
        at: usize,
    ) -> DResult {
        if n == 0 {
            return Ok(());
        }
        let view = src.slice(at..at + n);
        let (nn, w, c) = (u(n), u(width), u(col));
        launch!(self, set_col, per_item(n as u64), "set_col", |b| {
            b.arg(x).arg(&view).arg(&nn).arg(&w).arg(&c);
        })
    }

    fn bias_act(
        &mut self,
        h: &mut CudaSlice<f32>,
        n: usize,
        out: usize,
        bias: &CudaSlice<f32>,
        relu: bool,
    ) -> DResult {
        if n * out == 0 {
            return Ok(());
        }
        let (nn, o, r) = (u(n), u(out), relu as i32);
        launch!(self, bias_act, per_item((n * out) as u64), "bias", |b| {
            b.arg(h).arg(bias).arg(&nn).arg(&o).arg(&r);
        })
    }

    fn add_rows(
        &mut self,
        acc: &mut CudaSlice<f32>,
        n: usize,
        offsets: &CudaSlice<u32>,
        ids: &CudaSlice<u32>,
        w: &CudaSlice<f32>,
    ) -> DResult {
        if n == 0 {
            return Ok(());
        }
        let nn = u(n);
        launch!(self, add_rows, per_item(n as u64), "wide", |b| {
            b.arg(acc).arg(offsets).arg(ids).arg(w).arg(&nn);
        })
    }

    fn copy_add(
        &mut self,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        n: usize,
        add: f32,
    ) -> DResult {
        if n == 0 {
            return Ok(());
        }
        let nn = u(n);
        launch!(self, copy_add, per_item(n as u64), "copy", |b| {
            b.arg(dst).arg(src).arg(&nn).arg(&add);
        })
    }

    fn add(&mut self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, n: usize) -> DResult {
        if n == 0 {
            return Ok(());
        }
        let nn = u(n);
        launch!(self, add, per_item(n as u64), "add", |b| {
            b.arg(dst).arg(src).arg(&nn);
        })
    }

    fn fm_forward(
        &mut self,
        logits: &mut CudaSlice<f32>,
        sum: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        n: usize,
        width: usize,
        cols: &CudaSlice<u32>,
        fields: usize,
        dim: usize,
    ) -> DResult {
        if n == 0 {
            return Ok(());
        }
        let (nn, w, f, d) = (u(n), u(width), u(fields), u(dim));
        launch!(self, fm_forward, per_item(n as u64), "fm", |b| {
            b.arg(logits).arg(sum).arg(x).arg(cols);
            b.arg(&nn).arg(&w).arg(&f).arg(&d);
        })
    }

    fn fm_backward(
        &mut self,
        dx: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        sum: &CudaSlice<f32>,
        dlogit: &CudaSlice<f32>,
        n: usize,
        width: usize,
        cols: &CudaSlice<u32>,
        fields: usize,
        dim: usize,
    ) -> DResult {
        if n * dim == 0 {
            return Ok(());
        }
        let (nn, w, f, d) = (u(n), u(width), u(fields), u(dim));
        launch!(
            self,
            fm_backward,
            per_item((n * dim) as u64),
            "fm backward",
            |b| {
                b.arg(dx).arg(x).arg(sum).arg(dlogit).arg(cols);
                b.arg(&nn).arg(&w).arg(&f).arg(&d);
            }
        )
    }

    fn loss_grad(
        &mut self,
        logits: &CudaSlice<f32>,
        labels: &CudaSlice<f32>,
        head: Head,
        n: usize,
        scale: f32,
        dlogit: &mut CudaSlice<f32>,
        loss: &mut CudaSlice<f32>,
    ) -> DResult {
        let (nn, stride, at, w) = (u(n), u(head.stride), u(head.at), head.weight);
        launch!(self, loss_grad, per_item(n as u64), "loss", |b| {
            b.arg(logits).arg(labels).arg(dlogit).arg(loss);
            b.arg(&nn).arg(&stride).arg(&at).arg(&w).arg(&scale);
        })
    }

    fn softmax_rows(&mut self, x: &mut CudaSlice<f32>, n: usize, k: usize) -> DResult {
        let (nn, kk) = (u(n), u(k));
        launch!(self, softmax_rows, per_item(n as u64), "softmax", |b| {
            b.arg(x).arg(&nn).arg(&kk);
        })
    }

    fn axpy_rows(
        &mut self,
        dst: &mut CudaSlice<f32>,
        p: &CudaSlice<f32>,
        e: usize,
        k: usize,
        src: &CudaSlice<f32>,
        n: usize,
        width: usize,
    ) -> DResult {
        let total = (n * width) as u64;
        if total == 0 {
            return Ok(());
        }
        let cfg = per_item(total);
        let (ee, kk, nn, w) = (u(e), u(k), u(n), u(width));
        launch!(self, axpy_rows, cfg, "gated mixture", |b| {
            b.arg(dst).arg(p).arg(src);
            b.arg(&ee).arg(&kk).arg(&nn).arg(&w);
        })
    }

    fn row_dot(
        &mut self,
        ds: &mut CudaSlice<f32>,
        e: usize,
        k: usize,
        a: &CudaSlice<f32>,
        c: &CudaSlice<f32>,
        n: usize,
        width: usize,
    ) -> DResult {
        let (ee, kk, nn, w) = (u(e), u(k), u(n), u(width));
        launch!(self, row_dot, per_item(n as u64), "gate gradient", |b| {
            b.arg(ds).arg(a).arg(c);
            b.arg(&ee).arg(&kk).arg(&nn).arg(&w);
        })
    }

    fn softmax_back(
        &mut self,
        da: &mut CudaSlice<f32>,
        p: &CudaSlice<f32>,
        ds: &CudaSlice<f32>,
        n: usize,
        k: usize,
    ) -> DResult {
        let (nn, kk) = (u(n), u(k));
        launch!(
            self,
            softmax_back,
            per_item(n as u64),
            "softmax backward",
            |b| {
                b.arg(da).arg(p).arg(ds).arg(&nn).arg(&kk);
            }
        )
    }

    fn col_sum(
        &mut self,
        src: &CudaSlice<f32>,
        n: usize,
        width: usize,
        dst: &mut CudaSlice<f32>,
    ) -> DResult {
        let (nn, w) = (u(n), u(width));
        launch!(self, col_sum, per_item(width as u64), "column sums", |b| {
            b.arg(src).arg(dst).arg(&nn).arg(&w);
        })
    }

    fn relu_back(
        &mut self,
        dz: &mut CudaSlice<f32>,
        dh: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        len: usize,
        keep: f32,
    ) -> DResult {
        let l = len as u64;
        launch!(self, relu_back, per_item(l), "relu backward", |b| {
            b.arg(dz).arg(dh).arg(h).arg(&l).arg(&keep);
        })
    }

    fn mul(&mut self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, len: usize) -> DResult {
        let l = len as u64;
        launch!(self, mul, per_item(l), "dropout", |b| {
            b.arg(dst).arg(src).arg(&l);
        })
    }

    fn bn_forward(
        &mut self,
        h: &mut CudaSlice<f32>,
        xhat: &mut CudaSlice<f32>,
        inv: &mut CudaSlice<f32>,
        stats: &mut CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        n: usize,
        out: usize,
        weight: f32,
    ) -> DResult {
        let (nn, o) = (u(n), u(out));
        launch!(self, bn_forward, per_item(out as u64), "batch norm", |b| {
            b.arg(h).arg(xhat).arg(inv).arg(stats).arg(gamma).arg(beta);
            b.arg(&nn).arg(&o).arg(&weight);
        })
    }

    fn bn_backward(
        &mut self,
        dz: &mut CudaSlice<f32>,
        xhat: &CudaSlice<f32>,
        inv: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        n: usize,
        out: usize,
    ) -> DResult {
        let (nn, o) = (u(n), u(out));
        launch!(
            self,
            bn_backward,
            per_item(out as u64),
            "batch norm backward",
            |b| {
                b.arg(dz)
                    .arg(xhat)
                    .arg(inv)
                    .arg(gamma)
                    .arg(dgamma)
                    .arg(dbeta);
                b.arg(&nn).arg(&o);
            }
        )
    }

    fn cross_mix(
        &mut self,
        next: &mut CudaSlice<f32>,
        xl: &CudaSlice<f32>,
        x0: &CudaSlice<f32>,
        t: &CudaSlice<f32>,
        len: usize,
    ) -> DResult {
        let l = len as u64;
        launch!(self, cross_mix, per_item(l), "cross", |b| {
            b.arg(next).arg(xl).arg(x0).arg(t).arg(&l);
        })
    }

    fn cross_back(
        &mut self,
        dt: &mut CudaSlice<f32>,
        dx0: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        x0: &CudaSlice<f32>,
        t: &CudaSlice<f32>,
        len: usize,
    ) -> DResult {
        let l = len as u64;
        launch!(self, cross_back, per_item(l), "cross backward", |b| {
            b.arg(dt).arg(dx0).arg(g).arg(x0).arg(t).arg(&l);
        })
    }

    fn seg_reduce(
        &mut self,
        s: Seg,
        offsets: &CudaSlice<u32>,
        ex: &CudaSlice<u32>,
        scale: &CudaSlice<f32>,
        src: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> DResult {
        let total = (s.rows * s.dim) as u64;
        if total == 0 {
            return Ok(());
        }
        let cfg = per_item(total);
        let (rows, dim, width, col) = (u(s.rows), u(s.dim), u(s.width), u(s.col));
        launch!(self, seg_reduce, cfg, "sparse gradient", |b| {
            b.arg(out).arg(offsets).arg(ex).arg(scale).arg(src);
            b.arg(&rows).arg(&dim).arg(&width).arg(&col);
        })
    }

    fn adam(
        &mut self,
        a: AdamStep,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        len: usize,
    ) -> DResult {
        let l = len as u64;
        launch!(self, adam, per_item(l), "adam", |b| {
            b.arg(w).arg(g).arg(m).arg(v).arg(&l);
            b.arg(&a.c1).arg(&a.c2).arg(&a.lr).arg(&a.l2);
        })
    }

    fn all_reduce(group: &mut [(&mut Self, Vec<(&mut CudaSlice<f32>, usize)>)]) -> DResult {
        // Every rank's communicator first: a group that some ranks join and others do not would
        // leave the joined ones waiting forever.
        if let Some((dev, _)) = group.iter().find(|(d, _)| d.comm.is_none()) {
            return Err(DeviceError(format!(
                "GPU {}: no NCCL communicator",
                dev.ordinal
            )));
        }
        let nccl = |e| DeviceError(format!("NCCL all-reduce: {e:?}"));
        cudarc::nccl::result::group_start().map_err(nccl)?;
        let mut out = Ok(());
        for (dev, bufs) in group.iter_mut() {
            let comm = dev.comm.as_ref().expect("checked above");
            for (buf, len) in bufs.iter_mut() {
                if *len == 0 || out.is_err() {
                    continue;
                }
                let mut view = buf.slice_mut(..*len);
                if let Err(e) = comm.all_reduce_in_place(&mut view, &ReduceOp::Sum) {
                    // Enqueueing failed (NCCL checks its arguments): the group still ends, and
                    // the error fails the run, whose devices are not used again.
                    out = Err(nccl(e));
                }
            }
        }
        cudarc::nccl::result::group_end().map_err(nccl)?;
        out
    }
}

#[cfg(test)]
mod tests {
    /// The kernels' CUDA C, compiled as C11 by the machine's C compiler with the CUDA built-ins
    /// stubbed: every kernel parses and type-checks with no warning where no GPU and no NVRTC
    /// are (NVRTC compiles them for real when a device starts).
    #[test]
    fn the_kernels_compile_as_c_with_cuda_stubs() {
        if let Err(e) = rankd_engine::gpu::check_kernels_as_c(super::KERNELS) {
            panic!("the kernels do not compile:\n{e}");
        }
    }
}
