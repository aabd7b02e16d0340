//! The CUDA executor: the ops of [`super::batch`] as our kernels (CUDA C below, compiled at
//! start by NVRTC for the device's architecture) and cuBLAS `sgemm` calls, one stream per
//! slot, staging and scores through pinned host buffers.
//!
//! The CUDA libraries are opened at run time (`cudarc`'s dynamic loading): every build and every
//! test works on machines without CUDA, and [`probe`] reports what is missing instead of
//! panicking.
//!
//! Kernel by kernel, the semantics are those of [`super::sim`] (the host executor the tests
//! compare against the CPU engine): keep the two in step.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DriverError,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::batch::{ArenaLayout, Mat, Op, PlanParts, Sizes, Src};
use super::{DeviceInfo, GpuError, GpuErrorKind, Unavailable, Uploader};
use crate::plan::Plan;
use crate::Model;

/// The device code. One block per (row, descriptor) for the fills; one thread per element,
/// request or row for the rest. Offsets into the staging words are 32-bit (a batch is far
/// below 2^32 words), arena offsets 64-bit.
pub const KERNELS: &str = r#"
extern "C" __global__ void rk_fill(const unsigned* __restrict__ w, const float* __restrict__ arena,
                                   float* __restrict__ dst, unsigned rows, unsigned width,
                                   unsigned descs_at) {
    unsigned row = blockIdx.x;
    if (row >= rows) return;
    const unsigned* d = w + descs_at + blockIdx.y * 8u;
    unsigned kind = d[0], dim = d[1], col = d[2];
    unsigned long long table = (unsigned long long)d[3] | ((unsigned long long)d[4] << 32);
    unsigned offs_at = d[5], ids_at = d[6];
    float* out = dst + (unsigned long long)row * width + col;
    if (kind == 2u) {
        if (threadIdx.x == 0) out[0] = __uint_as_float(w[ids_at + row]);
        return;
    }
    unsigned b = w[offs_at + row], e = w[offs_at + row + 1];
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
        float acc = 0.0f;
        for (unsigned i = b; i < e; ++i) {
            acc += arena[table + (unsigned long long)w[ids_at + i] * dim + j];
        }
        if (kind == 1u && e - b > 1u) acc /= (float)(e - b);
        out[j] = acc;
    }
}

extern "C" __global__ void rk_add_bias(float* __restrict__ dst, const float* __restrict__ bias,
                                       const unsigned* __restrict__ w, unsigned rows,
                                       unsigned width, unsigned row_req_at, int per_request,
                                       int relu) {
    unsigned long long n = (unsigned long long)rows * width;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned r = (unsigned)(i / width), j = (unsigned)(i % width);
        unsigned brow = per_request ? w[row_req_at + r] : 0u;
        float v = dst[i] + bias[(unsigned long long)brow * width + j];
        dst[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

extern "C" __global__ void rk_user_terms(const unsigned* __restrict__ w,
                                         const float* __restrict__ arena,
                                         const float* __restrict__ u, float* __restrict__ ut,
                                         unsigned reqs, unsigned u_width, unsigned u_descs_at,
                                         unsigned u_ndesc, unsigned wide_at, unsigned nwide,
                                         float wide_bias, unsigned fm_dim) {
    unsigned r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= reqs) return;
    unsigned utw = fm_dim + 2u;
    float wide = wide_bias;
    for (unsigned k = 0; k < nwide; ++k) {
        const unsigned* d = w + wide_at + k * 4u;
        unsigned long long t = (unsigned long long)d[0] | ((unsigned long long)d[1] << 32);
        for (unsigned i = w[d[2] + r]; i < w[d[2] + r + 1]; ++i) wide += arena[t + w[d[3] + i]];
    }
    float* o = ut + (unsigned long long)r * utw;
    o[0] = wide;
    // Descriptor outer, dimension inner: the summation order of the host executor.
    float sq = 0.0f;
    for (unsigned dd = 0; dd < fm_dim; ++dd) o[2 + dd] = 0.0f;
    for (unsigned k = 0; fm_dim > 0u && k < u_ndesc; ++k) {
        const unsigned* d = w + u_descs_at + k * 8u;
        if (d[0] == 2u) continue;
        for (unsigned dd = 0; dd < fm_dim; ++dd) {
            float v = u[(unsigned long long)r * u_width + d[2] + dd];
            o[2 + dd] += v;
            sq += v * v;
        }
    }
    o[1] = sq;
}

extern "C" __global__ void rk_finish(const unsigned* __restrict__ w,
                                     const float* __restrict__ arena,
                                     const float* __restrict__ x, const float* __restrict__ deep,
                                     const float* __restrict__ ut, float* __restrict__ scores,
                                     unsigned rows, int has_deep, unsigned x_width,
                                     unsigned x_descs_at, unsigned x_ndesc, unsigned wide_at,
                                     unsigned nwide, unsigned row_req_at, unsigned fm_dim) {
    unsigned row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    unsigned req = w[row_req_at + row];
    float logit = has_deep ? deep[row] : 0.0f;
    for (unsigned k = 0; k < nwide; ++k) {
        const unsigned* d = w + wide_at + k * 4u;
        unsigned long long t = (unsigned long long)d[0] | ((unsigned long long)d[1] << 32);
        for (unsigned i = w[d[2] + row]; i < w[d[2] + row + 1]; ++i) logit += arena[t + w[d[3] + i]];
    }
    unsigned utw = fm_dim + 2u;
    const float* o = ut + (unsigned long long)req * utw;
    logit += o[0];
    if (fm_dim > 0u) {
        float sq = o[1], total = 0.0f;
        for (unsigned dd = 0; dd < fm_dim; ++dd) {
            float s = o[2 + dd];
            for (unsigned k = 0; k < x_ndesc; ++k) {
                const unsigned* d = w + x_descs_at + k * 8u;
                if (d[0] == 2u) continue;
                float v = x[(unsigned long long)row * x_width + d[2] + dd];
                s += v;
                sq += v * v;
            }
            total += s * s;
        }
        logit += 0.5f * (total - sq);
    }
    scores[row] = logit >= 0.0f ? 1.0f / (1.0f + expf(-logit)) : expf(logit) / (1.0f + expf(logit));
}

extern "C" __global__ void rk_relu_cols(float* __restrict__ dst, unsigned rows, unsigned width,
                                        unsigned cols) {
    unsigned long long n = (unsigned long long)rows * cols;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float* p = dst + (i / cols) * width + (i % cols);
        *p = fmaxf(*p, 0.0f);
    }
}

// One thread per (row, column) of the mixture; each recomputes its row's softmax (k is small)
// in the host executor's order: max, sum of exp, then p_e x_e summed over e.
extern "C" __global__ void rk_mix(const float* __restrict__ g, const float* __restrict__ x,
                                  float* __restrict__ out, unsigned rows, unsigned k,
                                  unsigned width, unsigned gate_col, unsigned gate_ld,
                                  unsigned step, unsigned ld) {
    unsigned long long n = (unsigned long long)rows * width;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / width, j = i % width;
        const float* z = g + r * gate_ld + gate_col;
        float mx = -__uint_as_float(0x7f800000u); /* -inf: NVRTC has no INFINITY */
        for (unsigned e = 0; e < k; ++e) mx = fmaxf(mx, z[e]);
        float sum = 0.0f;
        for (unsigned e = 0; e < k; ++e) sum += expf(z[e] - mx);
        float acc = 0.0f;
        for (unsigned e = 0; e < k; ++e) {
            acc += expf(z[e] - mx) / sum * x[(unsigned long long)e * step + r * ld + j];
        }
        out[i] = acc;
    }
}

extern "C" __global__ void rk_scatter(const unsigned* __restrict__ w, const float* __restrict__ x,
                                      const float* __restrict__ u, float* __restrict__ x0,
                                      unsigned rows, unsigned d, unsigned x_width,
                                      unsigned u_width, unsigned cols_at, unsigned row_req_at) {
    unsigned long long k = (unsigned long long)x_width + u_width;
    unsigned long long n = (unsigned long long)rows * k;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / k, j = i % k;
        float v = j < x_width ? x[r * x_width + j]
                              : u[(unsigned long long)w[row_req_at + r] * u_width + (j - x_width)];
        x0[r * d + w[cols_at + j]] = v;
    }
}

extern "C" __global__ void rk_cross_update(const float* __restrict__ x0,
                                           const float* __restrict__ t, float* __restrict__ xl,
                                           unsigned long long n, int first) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float a = x0[i];
        xl[i] = first ? a + a * t[i] : xl[i] + a * t[i];
    }
}

extern "C" __global__ void rk_score(const float* __restrict__ src, float* __restrict__ scores,
                                    unsigned rows, unsigned at) {
    unsigned r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float logit = src[r];
    scores[at + r] = logit >= 0.0f ? 1.0f / (1.0f + expf(-logit)) : expf(logit) / (1.0f + expf(logit));
}
"#;

/// Finds the libraries and the devices. Never panics: each library is looked for before the
/// first call into it.
pub(super) fn probe() -> Result<Vec<DeviceInfo>, Unavailable> {
    // SAFETY: each call only tries to open the shared library with `dlopen` (through
    // libloading) and closes it again; no symbol is called.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(Unavailable::NoDriver);
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(Unavailable::NoCublas);
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(Unavailable::NoNvrtc);
        }
    }
    let n = CudaContext::device_count().map_err(|e| Unavailable::Driver(e.to_string()))?;
    if n <= 0 {
        return Err(Unavailable::NoDevice);
    }
    let mut found = Vec::new();
    for ordinal in 0..n as usize {
        let ctx = CudaContext::new(ordinal).map_err(|e| Unavailable::Driver(e.to_string()))?;
        found.push(DeviceInfo {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            total_bytes: ctx.total_mem().unwrap_or(0) as u64,
        });
    }
    Ok(found)
}

/// Errors after which the context is unusable (the CUDA docs call them sticky), or the device
/// is gone: the device is taken out of service.
fn is_sticky(e: &DriverError) -> bool {
    matches!(
        e.0 as u32,
        46 /* DEVICE_UNAVAILABLE */
            | 100 /* NO_DEVICE */
            | 101 /* INVALID_DEVICE */
            | 214 /* ECC_UNCORRECTABLE */
            | 700 /* ILLEGAL_ADDRESS */
            | 702 /* LAUNCH_TIMEOUT */
            | 709 /* CONTEXT_IS_DESTROYED */
            | 714 /* HARDWARE_STACK_ERROR */
            | 715 /* ILLEGAL_INSTRUCTION */
            | 716 /* MISALIGNED_ADDRESS */
            | 717 /* INVALID_ADDRESS_SPACE */
            | 718 /* INVALID_PC */
            | 719 /* LAUNCH_FAILED */
            | 999 /* UNKNOWN */
    )
}

fn driver(what: &str, e: DriverError) -> GpuError {
    let kind = if e.0 as u32 == 2 {
        GpuErrorKind::OutOfMemory
    } else if is_sticky(&e) {
        GpuErrorKind::Lost
    } else {
        GpuErrorKind::Failed
    };
    GpuError::new(kind, format!("{what}: {e:?}"))
}

struct Kernels {
    fill: CudaFunction,
    add_bias: CudaFunction,
    user_terms: CudaFunction,
    finish: CudaFunction,
    relu_cols: CudaFunction,
    mix: CudaFunction,
    score: CudaFunction,
    scatter: CudaFunction,
    cross_update: CudaFunction,
}

/// Compiles CUDA C `source` with NVRTC for the architecture of `ctx`'s device and loads it: exact
/// division and square root, no flush to zero and no fused multiply-adds, so that the kernels
/// round like the host executors they are tested against (the engine's and the trainer's). The
/// error names the step that failed.
pub fn load_kernels(ctx: &Arc<CudaContext>, source: &str) -> Result<Arc<CudaModule>, String> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| format!("capability: {e:?}"))?;
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        source,
        cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ftz: Some(false),
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ..Default::default()
        },
    )
    .map_err(|e| format!("NVRTC: {e:?}"))?;
    ctx.load_module(ptx).map_err(|e| format!("module: {e:?}"))
}

/// Starts device `ordinal`: context, kernels, streams, cuBLAS handles.
pub(super) fn open(ordinal: usize) -> Result<(CudaExecutor, CudaUploader, String), GpuError> {
    let start = |what: &str, e: DriverError| {
        GpuError::new(GpuErrorKind::Start, format!("GPU {ordinal}: {what}: {e:?}"))
    };
    let ctx = CudaContext::new(ordinal).map_err(|e| start("context", e))?;
    // Buffers are used by one stream each (or written once and synchronized before use), so
    // cudarc's per-buffer events would only add work.
    // SAFETY: see above: no buffer is used by two streams without a synchronization between.
    unsafe { ctx.disable_event_tracking() };
    let name = format!(
        "cuda:{ordinal} ({})",
        ctx.name().unwrap_or_else(|_| "unknown".into())
    );
    let module = load_kernels(&ctx, KERNELS)
        .map_err(|e| GpuError::new(GpuErrorKind::Start, format!("GPU {ordinal}: {e}")))?;
    let f = |n: &str| module.load_function(n).map_err(|e| start(n, e));
    let kernels = Kernels {
        fill: f("rk_fill")?,
        add_bias: f("rk_add_bias")?,
        user_terms: f("rk_user_terms")?,
        finish: f("rk_finish")?,
        relu_cols: f("rk_relu_cols")?,
        mix: f("rk_mix")?,
        score: f("rk_score")?,
        scatter: f("rk_scatter")?,
        cross_update: f("rk_cross_update")?,
    };
    let mut slots = Vec::new();
    for _ in 0..SLOTS {
        slots.push(Slot::new(&ctx).map_err(|e| start("slot", e))?);
    }
    let upload = ctx.new_stream().map_err(|e| start("stream", e))?;
    Ok((
        CudaExecutor {
            ctx: ctx.clone(),
            kernels,
            slots,
            plans: HashMap::new(),
            fault: None,
        },
        CudaUploader {
            ctx,
            stream: upload,
            ordinal,
        },
        name,
    ))
}

/// Streams (batches in flight) per device.
const SLOTS: usize = 2;

/// A model's weights on one device.
#[derive(Debug)]
pub(crate) struct CudaResident {
    arena: CudaSlice<f32>,
}

/// Uploads models from the loading thread on its own stream, so that a load never waits behind
/// batches nor holds them up.
#[derive(Debug)]
pub(crate) struct CudaUploader {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
}

impl Uploader for CudaUploader {
    type Resident = CudaResident;

    fn upload(&self, model: &Model, layout: &ArenaLayout) -> Result<CudaResident, GpuError> {
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(|e| driver("memory info", e))?;
        super::check_fits(self.ordinal, layout.bytes(), free as u64)?;
        let mut arena = self
            .stream
            .alloc_zeros::<f32>(layout.len.max(1) as usize)
            .map_err(|e| driver("weights allocation", e))?;
        for &(at, blob, table) in &layout.blobs {
            let w = match table {
                Some(ei) => model.table_f32(&model.emb[ei]),
                None => std::borrow::Cow::Borrowed(model.weights(blob)),
            };
            let mut dst = arena.slice_mut(at as usize..at as usize + w.len());
            self.stream
                .memcpy_htod(&w[..], &mut dst)
                .map_err(|e| driver("weights upload", e))?;
        }
        self.stream
            .synchronize()
            .map_err(|e| driver("weights upload", e))?;
        Ok(CudaResident { arena })
    }
}

struct Slot {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    done: CudaEvent,
    staging: CudaSlice<u32>,
    host_staging: PinnedHostSlice<u32>,
    mats: Vec<Option<CudaSlice<f32>>>,
    scores: CudaSlice<f32>,
    host_scores: PinnedHostSlice<f32>,
    /// Scores of the batch in flight (rows times heads).
    n_scores: usize,
}

const MATS: [Mat; 14] = Mat::ALL;

fn mat(mats: &[Option<CudaSlice<f32>>], m: Mat) -> &CudaSlice<f32> {
    mats[mat_index(m)]
        .as_ref()
        .expect("work matrices are in place between ops")
}

/// The device buffer an operand names (a work matrix, the arena from an offset on, or the
/// plan's first-layer parts).
fn source<'a>(
    mats: &'a [Option<CudaSlice<f32>>],
    arena: &'a CudaSlice<f32>,
    parts: &'a PlanParts<CudaSlice<f32>>,
    src: Src,
) -> CudaView<'a, f32> {
    match src {
        Src::Mat(m) => mat(mats, m).as_view(),
        Src::MatAt(m, at) => mat(mats, m).slice(at as usize..),
        Src::Arena(off) => arena.slice(off as usize..),
        Src::W1Item => parts.w1_item.as_view(),
        Src::W1User => parts.w1_user.as_view(),
        Src::C0Item => parts.c0_item.as_view(),
        Src::C0User => parts.c0_user.as_view(),
    }
}

/// Runs `f` on work matrix `m` taken out of `mats`, so that `f` can read the others (an operand
/// of a product, a kernel's inputs) beside it, and puts it back whatever `f` returns.
fn with_taken<R>(
    mats: &mut [Option<CudaSlice<f32>>],
    m: Mat,
    f: impl FnOnce(&mut CudaSlice<f32>, &[Option<CudaSlice<f32>>]) -> R,
) -> R {
    let i = mat_index(m);
    let mut out = mats[i]
        .take()
        .expect("work matrices are in place between ops");
    let r = f(&mut out, mats);
    mats[i] = Some(out);
    r
}

fn mat_index(m: Mat) -> usize {
    MATS.iter()
        .position(|&x| x == m)
        .expect("every Mat is listed")
}

impl Slot {
    fn new(ctx: &Arc<CudaContext>) -> Result<Slot, DriverError> {
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|_| DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_INITIALIZED))?;
        // Waiting for a batch sleeps instead of spinning a core.
        let done = ctx.new_event(Some(
            cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC,
        ))?;
        let n = 1024;
        Ok(Slot {
            staging: stream.alloc_zeros(n)?,
            // SAFETY: the contents are written before they are read.
            host_staging: unsafe {
                ctx.alloc_pinned_with_flags(n, cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED)
            }?,
            mats: (0..MATS.len())
                .map(|_| stream.alloc_zeros(n).map(Some))
                .collect::<Result<_, _>>()?,
            scores: stream.alloc_zeros(n)?,
            // SAFETY: as above; read back only after the copy into it completed.
            host_scores: unsafe { ctx.alloc_pinned_with_flags(n, 0) }?,
            stream,
            blas,
            done,
            n_scores: 0,
        })
    }

    /// Grows the buffers (to a power of two) for `words` staging words and `sizes`.
    fn reserve(&mut self, words: usize, sizes: &Sizes) -> Result<(), DriverError> {
        let ctx = self.stream.context().clone();
        let grow = |n: usize| n.next_power_of_two().max(1024);
        // Device and host twins are checked together: a failed allocation of the second must
        // not leave them different sizes.
        if self.staging.len() < words || self.host_staging.len() < words {
            self.staging = self.stream.alloc_zeros(grow(words))?;
            // SAFETY: written before read.
            self.host_staging = unsafe {
                ctx.alloc_pinned_with_flags(
                    grow(words),
                    cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
                )
            }?;
        }
        for (i, m) in MATS.iter().enumerate() {
            let need = sizes.of(*m).max(1);
            if self.mats[i].as_ref().is_none_or(|b| b.len() < need) {
                self.mats[i] = Some(self.stream.alloc_zeros(grow(need))?);
            }
        }
        let scores = sizes.scores();
        if self.scores.len() < scores.max(1) || self.host_scores.len() < scores.max(1) {
            self.scores = self.stream.alloc_zeros(grow(scores))?;
            // SAFETY: read only after the copy into it completed.
            self.host_scores = unsafe { ctx.alloc_pinned_with_flags(grow(scores), 0) }?;
        }
        Ok(())
    }
}

/// A plan kept alive (its address is the key) with its parts on the device.
type DevicePlan = (Arc<Plan>, PlanParts<CudaSlice<f32>>);

/// The per-device executor, owned by the device's worker thread.
pub(crate) struct CudaExecutor {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    slots: Vec<Slot>,
    /// First-layer parts of each plan seen, by (model id, plan address).
    plans: HashMap<(u64, usize), DevicePlan>,
    fault: Option<super::Fault>,
}

impl std::fmt::Debug for CudaExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaExecutor")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

/// The launch of a grid-stride kernel over `n` elements: 256 threads a block.
fn elementwise(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks(n: u64, per: u32) -> u32 {
    n.div_ceil(per as u64).clamp(1, 65_535 * 64) as u32
}

impl CudaExecutor {
    fn plan_parts(
        &mut self,
        stream: &Arc<CudaStream>,
        model: &Model,
        plan: &Arc<Plan>,
    ) -> Result<(u64, usize), GpuError> {
        let key = (model.id(), Arc::as_ptr(plan) as usize);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.plans.entry(key) {
            let parts = super::batch::plan_parts(model, plan);
            let up = |v: &[f32]| -> Result<CudaSlice<f32>, GpuError> {
                let mut d = stream
                    .alloc_zeros::<f32>(v.len().max(1))
                    .map_err(|e| driver("plan allocation", e))?;
                if !v.is_empty() {
                    stream
                        .memcpy_htod(v, &mut d.slice_mut(..v.len()))
                        .map_err(|e| driver("plan upload", e))?;
                }
                Ok(d)
            };
            let parts = PlanParts {
                w1_item: up(&parts.w1_item)?,
                w1_user: up(&parts.w1_user)?,
                c0_item: up(&parts.c0_item)?,
                c0_user: up(&parts.c0_user)?,
            };
            // Both slots' streams use them: finish the copies first.
            stream.synchronize().map_err(|e| driver("plan upload", e))?;
            slot.insert((plan.clone(), parts));
        }
        Ok(key)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_ops(
        &mut self,
        slot: usize,
        arena: &CudaSlice<f32>,
        plan_key: (u64, usize),
        ops: &[Op],
    ) -> Result<(), GpuError> {
        let s = &mut self.slots[slot];
        let (_, parts) = &self.plans[&plan_key];
        let k = &self.kernels;
        for op in ops {
            match *op {
                Op::Fill {
                    dst,
                    rows,
                    width,
                    descs_at,
                    ndesc,
                } => {
                    if rows == 0 || ndesc == 0 {
                        continue;
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (rows, ndesc, 1),
                        block_dim: (32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let out = s.mats[mat_index(dst)].as_mut().expect("in place");
                    let mut b = s.stream.launch_builder(&k.fill);
                    b.arg(&s.staging).arg(arena).arg(out);
                    b.arg(&rows).arg(&width).arg(&descs_at);
                    // SAFETY: the arguments match the kernel's signature; every offset the
                    // descriptors hold was written by `assemble` for this batch and lies inside
                    // the staging buffer, the arena or `out` (sized by `reserve`).
                    unsafe { b.launch(cfg) }.map_err(|e| driver("fill", e))?;
                }
                Op::Gemm {
                    accumulate,
                    transa,
                    m,
                    n,
                    k: kk,
                    a,
                    lda,
                    b,
                    ldb,
                    c,
                    c_at,
                    ldc,
                } => {
                    if m == 0 || n == 0 {
                        continue;
                    }
                    // C taken out so that A and B can borrow the other matrices.
                    with_taken(&mut s.mats, c, |cbuf, mats| -> Result<(), GpuError> {
                        let at = c_at as usize;
                        if kk == 0 && accumulate {
                            return Ok(());
                        }
                        if kk == 0 {
                            return s
                                .stream
                                .memset_zeros(&mut cbuf.slice_mut(at..at + m as usize * n as usize))
                                .map_err(|e| driver("gemm (k = 0)", e));
                        }
                        let view = |src| source(mats, arena, parts, src);
                        let (av, bv) = (view(a), view(b));
                        let cfg = GemmConfig {
                            transa: if transa {
                                cublasOperation_t::CUBLAS_OP_T
                            } else {
                                cublasOperation_t::CUBLAS_OP_N
                            },
                            transb: cublasOperation_t::CUBLAS_OP_N,
                            m: m as i32,
                            n: n as i32,
                            k: kk as i32,
                            alpha: 1.0f32,
                            lda: lda as i32,
                            ldb: ldb as i32,
                            beta: if accumulate { 1.0f32 } else { 0.0f32 },
                            ldc: ldc as i32,
                        };
                        let mut cv = cbuf.slice_mut(at..);
                        // SAFETY: shapes, leading dimensions and C's offset come from `assemble`
                        // for the buffers `reserve` sized; C is a different buffer from A and B.
                        unsafe { s.blas.gemm(cfg, &av, &bv, &mut cv) }.map_err(|e| {
                            GpuError::new(GpuErrorKind::Failed, format!("cuBLAS sgemm: {e:?}"))
                        })
                    })?;
                }
                Op::AddBias {
                    dst,
                    dst_at,
                    rows,
                    width,
                    bias,
                    row_req_at,
                    relu,
                } => {
                    let n = rows as u64 * width as u64;
                    if n == 0 {
                        continue;
                    }
                    let (at, per) = (row_req_at.unwrap_or(0), i32::from(row_req_at.is_some()));
                    let relu = i32::from(relu);
                    let cfg = elementwise(n);
                    with_taken(&mut s.mats, dst, |out, mats| {
                        let bias_view = source(mats, arena, parts, bias);
                        let mut dst_view = out.slice_mut(dst_at as usize..);
                        let mut b = s.stream.launch_builder(&k.add_bias);
                        b.arg(&mut dst_view).arg(&bias_view).arg(&s.staging);
                        b.arg(&rows).arg(&width).arg(&at).arg(&per).arg(&relu);
                        // SAFETY: signature matches; indices stay inside the buffers (see
                        // `assemble`).
                        unsafe { b.launch(cfg) }.map_err(|e| driver("bias", e))
                    })?;
                }
                Op::Relu {
                    dst,
                    rows,
                    width,
                    cols,
                } => {
                    let n = rows as u64 * cols as u64;
                    if n == 0 {
                        continue;
                    }
                    let cfg = elementwise(n);
                    let out = s.mats[mat_index(dst)].as_mut().expect("in place");
                    let mut b = s.stream.launch_builder(&k.relu_cols);
                    b.arg(out).arg(&rows).arg(&width).arg(&cols);
                    // SAFETY: signature matches; `rows * width` elements are in place.
                    unsafe { b.launch(cfg) }.map_err(|e| driver("relu", e))?;
                }
                Op::Mix {
                    rows,
                    k: experts,
                    width,
                    gates,
                    gate_col,
                    gate_ld,
                    experts: xs,
                    step,
                    ld,
                    out,
                } => {
                    let n = rows as u64 * width as u64;
                    if n == 0 {
                        continue;
                    }
                    let cfg = elementwise(n);
                    with_taken(&mut s.mats, out, |dst, mats| {
                        let mut b = s.stream.launch_builder(&k.mix);
                        b.arg(mat(mats, gates)).arg(mat(mats, xs)).arg(dst);
                        b.arg(&rows).arg(&experts).arg(&width).arg(&gate_col);
                        b.arg(&gate_ld).arg(&step).arg(&ld);
                        // SAFETY: signature matches; the gates, experts and output sizes come
                        // from `assemble` (Sizes::e, m, h); `out` is neither input.
                        unsafe { b.launch(cfg) }.map_err(|e| driver("mix", e))
                    })?;
                }
                Op::Scatter {
                    rows,
                    d,
                    x_width,
                    u_width,
                    cols_at,
                    row_req_at,
                } => {
                    let n = rows as u64 * (x_width as u64 + u_width as u64);
                    if n == 0 {
                        continue;
                    }
                    let cfg = elementwise(n);
                    with_taken(&mut s.mats, Mat::X0, |x0, mats| {
                        let mut b = s.stream.launch_builder(&k.scatter);
                        b.arg(&s.staging)
                            .arg(mat(mats, Mat::X))
                            .arg(mat(mats, Mat::U))
                            .arg(x0);
                        b.arg(&rows).arg(&d).arg(&x_width).arg(&u_width);
                        b.arg(&cols_at).arg(&row_req_at);
                        // SAFETY: signature matches; the column map and the request index are
                        // in the staging words (`assemble`), every column is below `d`.
                        unsafe { b.launch(cfg) }.map_err(|e| driver("scatter", e))
                    })?;
                }
                Op::CrossUpdate { rows, d, first } => {
                    let n = rows as u64 * d as u64;
                    if n == 0 {
                        continue;
                    }
                    let cfg = elementwise(n);
                    let first = i32::from(first);
                    with_taken(&mut s.mats, Mat::Xl, |xl, mats| {
                        let mut b = s.stream.launch_builder(&k.cross_update);
                        b.arg(mat(mats, Mat::X0)).arg(mat(mats, Mat::Ct)).arg(xl);
                        b.arg(&n).arg(&first);
                        // SAFETY: signature matches; X0, Ct and Xl each hold `rows * d` values.
                        unsafe { b.launch(cfg) }.map_err(|e| driver("cross update", e))
                    })?;
                }
                Op::Score { src, rows, at } => {
                    if rows == 0 {
                        continue;
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (blocks(rows as u64, 128), 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut b = s.stream.launch_builder(&k.score);
                    b.arg(mat(&s.mats, src)).arg(&mut s.scores);
                    b.arg(&rows).arg(&at);
                    // SAFETY: signature matches; the scores hold `rows * heads` values.
                    unsafe { b.launch(cfg) }.map_err(|e| driver("score", e))?;
                }
                Op::UserTerms {
                    reqs,
                    u_width,
                    u_descs_at,
                    u_ndesc,
                    wide_at,
                    nwide,
                    wide_bias,
                    fm_dim,
                } => {
                    if reqs == 0 {
                        continue;
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (blocks(reqs as u64, 128), 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    with_taken(&mut s.mats, Mat::Ut, |out, mats| {
                        let mut b = s.stream.launch_builder(&k.user_terms);
                        b.arg(&s.staging).arg(arena).arg(mat(mats, Mat::U)).arg(out);
                        b.arg(&reqs).arg(&u_width).arg(&u_descs_at).arg(&u_ndesc);
                        b.arg(&wide_at).arg(&nwide).arg(&wide_bias).arg(&fm_dim);
                        // SAFETY: signature matches; indices stay inside the buffers.
                        unsafe { b.launch(cfg) }.map_err(|e| driver("user terms", e))
                    })?;
                }
                Op::Finish {
                    rows,
                    deep,
                    x_width,
                    x_descs_at,
                    x_ndesc,
                    wide_at,
                    nwide,
                    row_req_at,
                    fm_dim,
                } => {
                    if rows == 0 {
                        continue;
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (blocks(rows as u64, 128), 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let has_deep = i32::from(deep.is_some());
                    let deep = mat(&s.mats, deep.unwrap_or(Mat::H0));
                    let mut b = s.stream.launch_builder(&k.finish);
                    b.arg(&s.staging)
                        .arg(arena)
                        .arg(mat(&s.mats, Mat::X))
                        .arg(deep)
                        .arg(mat(&s.mats, Mat::Ut))
                        .arg(&mut s.scores);
                    b.arg(&rows).arg(&has_deep).arg(&x_width).arg(&x_descs_at);
                    b.arg(&x_ndesc)
                        .arg(&wide_at)
                        .arg(&nwide)
                        .arg(&row_req_at)
                        .arg(&fm_dim);
                    // SAFETY: signature matches; indices stay inside the buffers.
                    unsafe { b.launch(cfg) }.map_err(|e| driver("finish", e))?;
                }
            }
        }
        Ok(())
    }
}

impl CudaExecutor {
    #[allow(clippy::too_many_arguments)]
    fn try_launch(
        &mut self,
        slot: usize,
        resident: &CudaResident,
        model: &Model,
        plan: &Arc<Plan>,
        words: &[u32],
        ops: &[Op],
        sizes: &Sizes,
    ) -> Result<(), GpuError> {
        let stream = self.slots[slot].stream.clone();
        let plan_key = self.plan_parts(&stream, model, plan)?;
        {
            let s = &mut self.slots[slot];
            s.reserve(words.len(), sizes)
                .map_err(|e| driver("work space", e))?;
            let host = s
                .host_staging
                .as_mut_slice()
                .map_err(|e| driver("staging", e))?;
            host[..words.len()].copy_from_slice(words);
            s.stream
                .memcpy_htod(
                    &host[..words.len()],
                    &mut s.staging.slice_mut(..words.len()),
                )
                .map_err(|e| driver("staging upload", e))?;
        }
        if self.fault == Some(super::Fault::Lost) {
            self.fault = None;
            return Err(GpuError::new(
                GpuErrorKind::Lost,
                "injected fault: the device reports itself lost",
            ));
        }
        if self.fault.take() == Some(super::Fault::Failed) {
            // A real launch error: more threads per block than any device allows.
            let s = &self.slots[slot];
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (4096, 1, 1),
                shared_mem_bytes: 0,
            };
            let zero = 0u32;
            let mut b = s.stream.launch_builder(&self.kernels.finish);
            b.arg(&s.staging).arg(&resident.arena);
            for _ in 0..4 {
                b.arg(&s.scores);
            }
            for _ in 0..9 {
                b.arg(&zero);
            }
            // SAFETY: the launch is refused by the driver (invalid block size) before it runs.
            unsafe { b.launch(cfg) }.map_err(|e| driver("injected fault", e))?;
        }
        self.run_ops(slot, &resident.arena, plan_key, ops)?;
        let s = &mut self.slots[slot];
        // Every head's scores, head by head.
        s.n_scores = sizes.scores();
        if s.n_scores > 0 {
            let host = s
                .host_scores
                .as_mut_slice()
                .map_err(|e| driver("scores", e))?;
            s.stream
                .memcpy_dtoh(&s.scores.slice(..s.n_scores), &mut host[..s.n_scores])
                .map_err(|e| driver("scores download", e))?;
        }
        s.done.record(&s.stream).map_err(|e| driver("event", e))?;
        Ok(())
    }
}

impl super::worker::Executor for CudaExecutor {
    type Resident = CudaResident;

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn launch(
        &mut self,
        slot: usize,
        resident: &CudaResident,
        model: &Model,
        plan: &Arc<Plan>,
        words: &[u32],
        ops: &[Op],
        sizes: &Sizes,
    ) -> Result<(), GpuError> {
        let r = self.try_launch(slot, resident, model, plan, words, ops, sizes);
        if r.is_err() {
            // Work queued before the error may still run: let it finish before the slot's
            // staging buffer is reused or the jobs' weights can be freed.
            let _ = self.slots[slot].stream.synchronize();
        }
        r
    }

    fn quiesce(&mut self) {
        for s in &self.slots {
            let _ = s.stream.synchronize();
        }
    }

    fn poll(&mut self, slot: usize) -> Result<bool, GpuError> {
        self.slots[slot]
            .done
            .try_is_complete()
            .map_err(|e| driver("batch", e))
    }

    fn finish(&mut self, slot: usize) -> Result<&[f32], GpuError> {
        let s = &self.slots[slot];
        s.done.synchronize().map_err(|e| driver("batch", e))?;
        let host = s.host_scores.as_slice().map_err(|e| driver("scores", e))?;
        Ok(&host[..s.n_scores])
    }

    fn forget(&mut self, model_id: u64) {
        self.plans.retain(|k, _| k.0 != model_id);
    }

    fn inject_fault(&mut self, fault: super::Fault) {
        self.fault = Some(fault);
    }
}

/// Measures cuBLAS `sgemm` on device `ordinal`: for each `(m, n, k)` chain of shapes (run back
/// to back, as a model's layers are), the GFLOP/s over `iters` runs of the chain, timed with
/// device events after a warm-up run. For the GPU benchmark: the dense layers' rate as a share
/// of the same run's large square `sgemm`.
pub fn sgemm_gflops(
    ordinal: usize,
    chains: &[Vec<(usize, usize, usize)>],
    iters: usize,
) -> Result<Vec<f64>, GpuError> {
    let ctx = CudaContext::new(ordinal).map_err(|e| driver("context", e))?;
    let stream = ctx.new_stream().map_err(|e| driver("stream", e))?;
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| GpuError::new(GpuErrorKind::Start, format!("cuBLAS: {e:?}")))?;
    let mut out = Vec::new();
    for chain in chains {
        let mut bufs = Vec::new();
        for &(m, n, k) in chain {
            let alloc = |len: usize| {
                stream
                    .alloc_zeros::<f32>(len.max(1))
                    .map_err(|e| driver("allocation", e))
            };
            bufs.push((alloc(m * k)?, alloc(k * n)?, alloc(m * n)?));
        }
        let run = |bufs: &mut Vec<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>| {
            for (&(m, n, k), (a, b, c)) in chain.iter().zip(bufs.iter_mut()) {
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: m as i32,
                    n: n as i32,
                    k: k as i32,
                    alpha: 1.0f32,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: 0.0f32,
                    ldc: m as i32,
                };
                // SAFETY: each buffer holds the elements its shape and leading dimension need.
                unsafe { blas.gemm(cfg, a, b, c) }
                    .map_err(|e| GpuError::new(GpuErrorKind::Failed, format!("sgemm: {e:?}")))?;
            }
            Ok::<(), GpuError>(())
        };
        run(&mut bufs)?;
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx.new_event(timing).map_err(|e| driver("event", e))?;
        let end = ctx.new_event(timing).map_err(|e| driver("event", e))?;
        start.record(&stream).map_err(|e| driver("event", e))?;
        for _ in 0..iters {
            run(&mut bufs)?;
        }
        end.record(&stream).map_err(|e| driver("event", e))?;
        end.synchronize().map_err(|e| driver("event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| driver("event", e))? as f64;
        let flops: f64 = chain
            .iter()
            .map(|&(m, n, k)| 2.0 * m as f64 * n as f64 * k as f64)
            .sum::<f64>()
            * iters as f64;
        out.push(flops / (ms / 1e3) / 1e9);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The kernels' CUDA C, compiled as C11 by the machine's C compiler with the CUDA built-ins
    /// stubbed: every kernel parses and type-checks with no warning even where no GPU and no
    /// NVRTC are (NVRTC compiles them for real when a device starts).
    #[test]
    fn the_kernels_compile_as_c_with_cuda_stubs() {
        if let Err(e) = crate::gpu::check_kernels_as_c(super::KERNELS) {
            panic!("the kernels do not compile:\n{e}");
        }
    }
}
