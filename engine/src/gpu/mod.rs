//! The GPU backend: batched inference through cuBLAS and our own kernels, fed by every core.
//!
//! - [`DeviceSpec`] and [`select`] decide where models run (`auto`, `cpu`, `cuda`, `cuda:0,1`)
//!   from what [`probe`] finds (driver, cuBLAS, NVRTC, devices), with one clear reason when the
//!   answer is the CPU.
//! - [`Gpus`] owns one worker thread per device ([`worker`]) and uploads each model version's
//!   weights to every device when the version loads, off the request path. A version too large
//!   for a device's free memory is refused by that device with a clear error and served by the
//!   CPU engine (the daemon logs why and `/models` says `cpu`).
//! - [`GpuCore`] is a core's handle: it transforms features on the core (the CPU's job), sends
//!   the rows of each request shape to a device and awaits the scores without blocking the core.
//!   Models not on any device, and requests caught by a lost device, are scored by the core's
//!   own CPU engine.
//! - [`batch`] lays a batch out for the device and lists its operations; [`sim`] runs those
//!   operations on the host, the contract the CUDA kernels ([`cuda`]) implement.

pub(crate) mod batch;
pub mod cuda;
pub(crate) mod sim;
pub(crate) mod worker;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crossbeam_channel::Sender;
use futures_channel::oneshot;

use crate::cpu::{group_end, transform_group, CpuEngine, Split};
use crate::plan::PlanCache;
use crate::{BatchOutput, EngineError, FeatureSet, InferenceBackend, Model, Request};
use batch::{ArenaLayout, Rows};
pub use worker::BatchSettings;
use worker::{Adopt, Cmd, Done, Job};

/// Where the daemon runs its models, as configured (`[engine] device`, `--device`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// Every visible GPU when the CUDA driver and cuBLAS load, else the CPU.
    #[default]
    Auto,
    /// The CPU engine only.
    Cpu,
    /// GPUs, or fail to start: every visible one (`None`) or the listed ordinals.
    Cuda(Option<Vec<usize>>),
    /// `emulated:N`: N emulated devices that run the device operations on the host
    /// ([`Gpus::emulated`]). Slow; for testing the daemon's GPU path on machines without one.
    Emulated(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            other if other.starts_with("emulated:") => {
                let n: usize = other["emulated:".len()..]
                    .parse()
                    .ok()
                    .filter(|n| (1..=32).contains(n))
                    .ok_or_else(|| {
                        format!("device {other:?}: expected emulated:N, N from 1 to 32")
                    })?;
                Ok(DeviceSpec::Emulated(n))
            }
            other => {
                let list = other.strip_prefix("cuda:").ok_or_else(|| {
                    format!(
                        "device {other:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:0,1\""
                    )
                })?;
                let mut ordinals = Vec::new();
                for part in list.split(',') {
                    let n: usize = part
                        .trim()
                        .parse()
                        .map_err(|_| format!("device {other:?}: {part:?} is not a GPU ordinal"))?;
                    if n >= 32 {
                        return Err(format!("device {other:?}: GPU {n}: at most 32 GPUs (0-31)"));
                    }
                    if ordinals.contains(&n) {
                        return Err(format!("device {other:?}: GPU {n} is listed twice"));
                    }
                    ordinals.push(n);
                }
                Ok(DeviceSpec::Cuda(Some(ordinals)))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Emulated(n) => write!(f, "emulated:{n}"),
            DeviceSpec::Cuda(Some(list)) => {
                let l: Vec<String> = list.iter().map(|n| n.to_string()).collect();
                write!(f, "cuda:{}", l.join(","))
            }
        }
    }
}

/// A GPU found by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
}

/// Why there is no usable GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// `libcuda.so` could not be loaded.
    NoDriver,
    /// `libcublas.so` could not be loaded.
    NoCublas,
    /// `libnvrtc.so` (which compiles the kernels at start) could not be loaded.
    NoNvrtc,
    /// The driver loaded but sees no device.
    NoDevice,
    /// The driver failed.
    Driver(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoDriver => f.write_str("no CUDA driver (libcuda.so could not be loaded)"),
            Unavailable::NoCublas => f.write_str("no cuBLAS (libcublas.so could not be loaded)"),
            Unavailable::NoNvrtc => f.write_str("no NVRTC (libnvrtc.so could not be loaded)"),
            Unavailable::NoDevice => f.write_str("the CUDA driver sees no GPU"),
            Unavailable::Driver(e) => write!(f, "the CUDA driver failed: {e}"),
        }
    }
}

/// Compiles CUDA C kernels as C11 with the machine's C compiler (`$CC`, else `cc`), the CUDA
/// built-ins stubbed, warnings as errors, syntax only: every kernel parses and type-checks where
/// no GPU and no NVRTC are (NVRTC compiles them for real when a device starts). `Ok(false)`: no C
/// compiler here, outside CI (CI has one: it links Rust); `Err`: the compiler's complaints.
/// For tests (this crate's and the trainer's).
#[doc(hidden)]
pub fn check_kernels_as_c(source: &str) -> Result<bool, String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    // What NVRTC has without headers: the device math functions, `isnan`; no `<math.h>` (so no
    // `INFINITY` or `NAN`, which NVRTC lacks too).
    let prelude = "float expf(float); float log1pf(float); float fabsf(float); \
                   float fmaxf(float, float); float sqrtf(float);\n\
                   #define isnan(x) __builtin_isnan(x)\n\
                   #define __global__\n#define __restrict__ restrict\n\
                   typedef struct { unsigned x, y, z; } dim3;\n\
                   static dim3 blockIdx, threadIdx, blockDim, gridDim;\n\
                   static float __uint_as_float(unsigned u) { union { unsigned u; float f; } \
                   v; v.u = u; return v.f; }\n";
    let source = format!("{prelude}{}", source.replace("extern \"C\" ", ""));
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("rankd-kernels-{}-{n}.c", std::process::id()));
    std::fs::write(&path, source).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = std::process::Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"])
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    match out {
        Ok(o) if o.status.success() => Ok(true),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: no C compiler `{cc}`: {e}");
            Ok(false)
        }
        Err(e) => Err(format!("no C compiler `{cc}` in CI: {e}")),
    }
}

/// Looks for the CUDA libraries and devices without ever panicking.
pub fn probe() -> Result<Vec<DeviceInfo>, Unavailable> {
    cuda::probe()
}

/// Where models run, decided at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The CPU engine, and why.
    Cpu {
        /// One line for the log.
        reason: String,
    },
    /// These GPUs.
    Cuda(Vec<usize>),
    /// This many emulated devices.
    Emulated(usize),
}

/// Decides from the configured spec and what [`probe`] found. `auto` falls back to the CPU
/// with a reason; an explicit `cuda` that cannot be honoured is an error (the operator asked
/// for GPUs).
pub fn select(
    spec: &DeviceSpec,
    found: &Result<Vec<DeviceInfo>, Unavailable>,
) -> Result<Selection, String> {
    match (spec, found) {
        (DeviceSpec::Emulated(n), _) => Ok(Selection::Emulated(*n)),
        (DeviceSpec::Cpu, _) => Ok(Selection::Cpu {
            reason: "device = \"cpu\" is configured".into(),
        }),
        (DeviceSpec::Auto, Err(why)) => Ok(Selection::Cpu {
            reason: format!("device = \"auto\" and {why}"),
        }),
        (DeviceSpec::Auto, Ok(devs)) if devs.is_empty() => Ok(Selection::Cpu {
            reason: format!("device = \"auto\" and {}", Unavailable::NoDevice),
        }),
        (DeviceSpec::Auto | DeviceSpec::Cuda(None), Ok(devs)) if !devs.is_empty() => {
            Ok(Selection::Cuda(devs.iter().map(|d| d.ordinal).collect()))
        }
        (DeviceSpec::Cuda(_), Err(why)) => Err(format!("device = \"{spec}\" but {why}")),
        (DeviceSpec::Cuda(None), Ok(_)) => {
            Err(format!("device = \"{spec}\" but {}", Unavailable::NoDevice))
        }
        (DeviceSpec::Cuda(Some(list)), Ok(devs)) => {
            for n in list {
                if !devs.iter().any(|d| d.ordinal == *n) {
                    return Err(format!(
                        "device = \"{spec}\" but there is no GPU {n} ({} visible)",
                        devs.len()
                    ));
                }
            }
            Ok(Selection::Cuda(list.clone()))
        }
        (DeviceSpec::Auto, Ok(_)) => unreachable!("covered by the guards above"),
    }
}

/// What went wrong on a device.
#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub enum GpuErrorKind {
    /// The device could not be started (driver, kernels, cuBLAS).
    Start,
    /// Not enough device memory.
    OutOfMemory,
    /// A call failed; the device is still usable (that batch failed).
    Failed,
    /// The device is gone (Xid, reset, a sticky error): its models move to the CPU.
    Lost,
    /// The model is not on this device (refused at load, or freed).
    NotResident,
}

/// A device error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GpuError {
    /// Its kind.
    pub kind: GpuErrorKind,
    /// What happened.
    pub message: String,
}

impl GpuError {
    pub(crate) fn new(kind: GpuErrorKind, message: impl Into<String>) -> GpuError {
        GpuError {
            kind,
            message: message.into(),
        }
    }
}

/// A fault to inject into a device's next batch (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A real device error on CUDA (a launch the driver refuses), an error from the emulation:
    /// the batch fails, the device goes on.
    Failed,
    /// The device reports itself lost (as after an Xid or a reset): it leaves service and its
    /// models go to the CPU engine.
    Lost,
}

/// Counters of the GPU backend, for `/metrics`.
#[derive(Debug, Default)]
pub struct GpuMetrics {
    /// Device batches launched.
    pub batches: AtomicU64,
    /// Items in them.
    pub items: AtomicU64,
    /// Core jobs merged into them.
    pub jobs: AtomicU64,
    /// Failed device batches (CUDA errors).
    pub errors: AtomicU64,
    /// Requests scored on the CPU because their device was lost or refused the model.
    pub cpu_fallbacks: AtomicU64,
    /// Model versions freed from device memory.
    pub unloads: AtomicU64,
}

/// Where a model version runs; set when the version loads.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    /// Bit `i`: on device `i` of the [`Gpus`].
    pub gpus: AtomicU32,
    /// Why not on the GPU, if it is not.
    pub note: Mutex<Option<String>>,
    /// `cuda` or `emulated`.
    pub kind: Mutex<&'static str>,
}

/// State shared by the devices, the cores and the loader.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    lost: AtomicU32,
    models: Mutex<Vec<Weak<Model>>>,
    metrics: GpuMetrics,
}

impl Shared {
    fn mark_lost(&self, device: usize) {
        self.lost.fetch_or(1 << device, Ordering::SeqCst);
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        for m in models.iter().filter_map(Weak::upgrade) {
            m.placement.gpus.fetch_and(!(1 << device), Ordering::SeqCst);
            let mut note = m.placement.note.lock().unwrap_or_else(|e| e.into_inner());
            *note = Some(format!("GPU {device} was lost"));
        }
    }
}

/// Device memory kept free beside a model's weights for the batches' work space.
pub(crate) const WORK_RESERVE_BYTES: u64 = 512 << 20;

/// Whether a version of `weights` bytes fits device `index` with `free` bytes free, keeping
/// [`WORK_RESERVE_BYTES`] for the work space; the error names the sizes.
pub(crate) fn check_fits(index: usize, weights: u64, free: u64) -> Result<(), GpuError> {
    let need = weights + WORK_RESERVE_BYTES;
    if need > free {
        return Err(GpuError::new(
            GpuErrorKind::OutOfMemory,
            format!(
                "GPU {index}: the model needs {} MiB of device memory ({} MiB of weights and {} \
                 MiB of work space) and {} MiB are free",
                need >> 20,
                weights >> 20,
                WORK_RESERVE_BYTES >> 20,
                free >> 20
            ),
        ));
    }
    Ok(())
}

/// Uploads a model's weights to one device, from any thread.
pub(crate) trait Uploader: Send + Sync + 'static {
    type Resident: Send + 'static;
    fn upload(&self, model: &Model, layout: &ArenaLayout) -> Result<Self::Resident, GpuError>;
}

/// A device as the rest of the engine sees it.
trait DeviceHandle: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn load(&self, model: &Model, layout: &ArenaLayout) -> Result<(), GpuError>;
    fn submit(&self, job: Job) -> Result<(), Box<Job>>;
    fn fault(&self, fault: Fault);
}

struct Device<U: Uploader> {
    name: String,
    uploader: U,
    tx: Option<Sender<Cmd<U::Resident>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<U: Uploader> fmt::Debug for Device<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("name", &self.name).finish()
    }
}

impl<U: Uploader> DeviceHandle for Device<U> {
    fn name(&self) -> &str {
        &self.name
    }

    fn load(&self, model: &Model, layout: &ArenaLayout) -> Result<(), GpuError> {
        let resident = self.uploader.upload(model, layout)?;
        let tx = self.tx.as_ref().expect("a running device has a sender");
        tx.send(Cmd::Adopt(Adopt {
            model_id: model.id(),
            alive: model.alive(),
            layout: layout.clone(),
            resident,
        }))
        .map_err(|_| GpuError::new(GpuErrorKind::Lost, format!("{}: worker stopped", self.name)))
    }

    fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        let tx = self.tx.as_ref().expect("a running device has a sender");
        tx.send(Cmd::Job(job)).map_err(|e| match e.0 {
            Cmd::Job(j) => Box::new(j),
            _ => unreachable!("a job was sent"),
        })
    }

    fn fault(&self, fault: Fault) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Fault(fault));
        }
    }
}

impl<U: Uploader> Drop for Device<U> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The GPUs of the process: one worker thread each. Share through `Arc`.
#[derive(Debug)]
pub struct Gpus {
    kind: &'static str,
    devices: Vec<Box<dyn DeviceHandle>>,
    shared: Arc<Shared>,
    next: AtomicUsize,
}

impl Gpus {
    /// Starts the CUDA devices `ordinals` (compiles the kernels, creates streams and cuBLAS
    /// handles). Fails on the first device that cannot start.
    pub fn start(ordinals: &[usize], settings: BatchSettings) -> Result<Arc<Gpus>, GpuError> {
        let shared = Arc::new(Shared::default());
        let mut devices: Vec<Box<dyn DeviceHandle>> = Vec::new();
        for (index, &ordinal) in ordinals.iter().enumerate() {
            let (exec, uploader, name) = cuda::open(ordinal)?;
            devices.push(Box::new(spawn(
                index, name, exec, uploader, &shared, settings,
            )?));
        }
        Ok(Arc::new(Gpus {
            kind: "cuda",
            devices,
            shared,
            next: AtomicUsize::new(0),
        }))
    }

    /// `n` emulated devices that run the device operations on the host, with the same
    /// batching, slots, residency and error handling as CUDA devices. For testing everything
    /// but the kernels on machines without a GPU; far slower than the CPU engine.
    pub fn emulated(n: usize, settings: BatchSettings) -> Arc<Gpus> {
        Self::emulated_with_memory(n, settings, None)
    }

    /// [`Self::emulated`] devices with `memory` bytes of device memory free each: a version
    /// that does not fit is refused as a CUDA device refuses it.
    pub fn emulated_with_memory(
        n: usize,
        settings: BatchSettings,
        memory: Option<u64>,
    ) -> Arc<Gpus> {
        let shared = Arc::new(Shared::default());
        let devices = (0..n)
            .map(|i| {
                let d = spawn(
                    i,
                    format!("emulated:{i}"),
                    sim::HostExecutor::new(2),
                    sim::HostUploader { memory, index: i },
                    &shared,
                    settings,
                )
                .expect("a host thread starts");
                Box::new(d) as Box<dyn DeviceHandle>
            })
            .collect();
        Arc::new(Gpus {
            kind: "emulated",
            devices,
            shared,
            next: AtomicUsize::new(0),
        })
    }

    /// Device names, in index order.
    pub fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name().to_owned()).collect()
    }

    /// Uploads `model` to every device that is not lost. The model then runs on the devices
    /// that took it; one that refuses it (out of memory) leaves it to the others, and a model
    /// no device took runs on the CPU. Returns the first refusal when no device took it.
    pub fn load(&self, model: &Arc<Model>) -> Result<(), GpuError> {
        let layout = ArenaLayout::new(model);
        let lost = self.shared.lost.load(Ordering::SeqCst);
        let mut bits = 0u32;
        let mut first_err = None;
        for (i, d) in self.devices.iter().enumerate() {
            if lost & (1 << i) != 0 {
                continue;
            }
            match d.load(model, &layout) {
                Ok(()) => bits |= 1 << i,
                Err(e) => {
                    eprintln!(
                        "rankd: {} v{} not loaded on {}: {e}",
                        model.name(),
                        model.version(),
                        d.name()
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        {
            let mut models = self.shared.models.lock().unwrap_or_else(|e| e.into_inner());
            models.retain(|m| m.strong_count() > 0);
            models.push(Arc::downgrade(model));
        }
        *model
            .placement
            .kind
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.kind;
        model.placement.gpus.store(bits, Ordering::SeqCst);
        let mut note = model
            .placement
            .note
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (bits, first_err) {
            (0, Some(e)) => {
                *note = Some(e.message.clone());
                Err(e)
            }
            (0, None) => {
                *note = Some("every GPU is lost".into());
                Err(GpuError::new(GpuErrorKind::Lost, "every GPU is lost"))
            }
            _ => {
                *note = None;
                Ok(())
            }
        }
    }

    /// Makes the next batch on device `index` fail (tests).
    pub fn inject_fault(&self, index: usize, fault: Fault) {
        if let Some(d) = self.devices.get(index) {
            d.fault(fault);
        }
    }

    /// Counters.
    pub fn metrics(&self) -> &GpuMetrics {
        &self.shared.metrics
    }

    /// Whether device `index` was lost.
    pub fn is_lost(&self, index: usize) -> bool {
        self.shared.lost.load(Ordering::SeqCst) & (1 << index) != 0
    }

    /// A handle for one core.
    pub fn core(self: &Arc<Self>) -> GpuCore {
        GpuCore {
            gpus: self.clone(),
            cpu: CpuEngine::new(),
            plans: PlanCache::default(),
            key: FeatureSet::default(),
            next_key: FeatureSet::default(),
            spare: Vec::new(),
        }
    }

    fn pick(&self, usable: u32) -> usize {
        let n = usable.count_ones() as usize;
        let k = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut bits = usable;
        for _ in 0..k {
            bits &= bits - 1;
        }
        bits.trailing_zeros() as usize
    }
}

fn spawn<E, U>(
    index: usize,
    name: String,
    exec: E,
    uploader: U,
    shared: &Arc<Shared>,
    settings: BatchSettings,
) -> Result<Device<U>, GpuError>
where
    E: worker::Executor<Resident = U::Resident>,
    U: Uploader,
{
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("rankd-gpu-{index}"))
        .spawn(move || worker::run(exec, index, rx, shared, settings))
        .map_err(|e| GpuError::new(GpuErrorKind::Start, format!("worker thread: {e}")))?;
    Ok(Device {
        name,
        uploader,
        tx: Some(tx),
        thread: Some(thread),
    })
}

/// A core's handle on the GPUs: transforms on the core, scores on a device, the CPU engine for
/// what no device can take.
#[derive(Debug)]
pub struct GpuCore {
    gpus: Arc<Gpus>,
    cpu: CpuEngine,
    plans: PlanCache,
    key: FeatureSet,
    next_key: FeatureSet,
    spare: Vec<Rows>,
}

impl GpuCore {
    /// Which backend scores `model` now: `cuda` or `cpu`.
    pub fn backend_for(&self, model: &Model) -> &'static str {
        if self.usable(model) == 0 {
            "cpu"
        } else {
            "cuda"
        }
    }

    fn usable(&self, model: &Model) -> u32 {
        model.placement.gpus.load(Ordering::Relaxed)
            & !self.gpus.shared.lost.load(Ordering::Relaxed)
    }

    /// Scores like [`InferenceBackend::score`], awaiting the device without blocking the
    /// thread.
    pub async fn score(
        &mut self,
        model: &Arc<Model>,
        requests: &[&dyn Request],
        out: &mut BatchOutput,
    ) {
        let usable = self.usable(model);
        if usable == 0 {
            self.cpu.score(model, requests, out);
            return;
        }
        let base = out.results.len();
        out.begin(requests.len());
        let mut waits = Vec::new();
        let mut key = std::mem::take(&mut self.key);
        let mut next = std::mem::take(&mut self.next_key);
        let mut start = 0;
        while start < requests.len() {
            let end = group_end(
                model,
                requests,
                start,
                Split::RequestLevel,
                &mut key,
                &mut next,
            );
            let plan = self.plans.get(model, &key);
            let group = start..end;
            let mut rows = self.spare.pop().unwrap_or_default();
            rows.clear();
            transform_group(
                model,
                &plan,
                requests,
                group.clone(),
                &mut rows.user,
                &mut rows.items,
                &mut rows.segs,
                out,
                base,
            );
            start = end;
            if rows.segs.is_empty() {
                self.spare.push(rows);
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let job = Job {
                model: model.clone(),
                plan,
                rows,
                queued: std::time::Instant::now(),
                done: tx,
            };
            let device = self.gpus.pick(usable);
            match self.gpus.devices[device].submit(job) {
                Ok(()) => waits.push((rx, group)),
                Err(job) => {
                    // The worker is gone: score here.
                    self.rescore(model, requests, &job.rows, out, base);
                    self.spare.push(job.rows);
                }
            }
        }
        self.key = key;
        self.next_key = next;
        for (rx, group) in waits {
            match rx.await {
                Ok(Done {
                    rows,
                    result: Ok(()),
                }) => {
                    // Head by head (one head for a single-task model): the default head to
                    // `scores`, the others to `heads`.
                    let n = rows.items();
                    let heads = model.num_heads();
                    for seg in &rows.segs {
                        let begin = out.scores.len();
                        out.scores
                            .extend_from_slice(&rows.scores[seg.start..seg.start + seg.len]);
                        out.results[base + seg.request] = Ok(begin..out.scores.len());
                        if heads > 1 {
                            out.head_at[base + seg.request] = (out.heads.len(), (heads - 1) as u32);
                            for h in 1..heads {
                                let from = h * n + seg.start;
                                out.heads
                                    .extend_from_slice(&rows.scores[from..from + seg.len]);
                            }
                        }
                    }
                    self.spare.push(rows);
                }
                Ok(Done {
                    rows,
                    result: Err(e),
                }) => {
                    if matches!(e.kind, GpuErrorKind::Lost | GpuErrorKind::NotResident) {
                        // Nothing was computed wrong, the device just cannot: the CPU can.
                        self.rescore(model, requests, &rows, out, base);
                    } else {
                        for seg in &rows.segs {
                            out.results[base + seg.request] = Err(EngineError::Device(e.clone()));
                        }
                    }
                    self.spare.push(rows);
                }
                Err(oneshot::Canceled) => {
                    // Unreachable in practice: the worker answers every job, even when its
                    // device is lost. Should it ever drop one, the requests get an error
                    // rather than hang.
                    for r in &mut out.results[base + group.start..base + group.end] {
                        if r.is_ok() {
                            *r = Err(EngineError::Device(GpuError::new(
                                GpuErrorKind::Lost,
                                "the GPU worker stopped",
                            )));
                        }
                    }
                }
            }
        }
    }

    /// Scores the requests of `rows` on the core's CPU engine.
    fn rescore(
        &mut self,
        model: &Model,
        requests: &[&dyn Request],
        rows: &Rows,
        out: &mut BatchOutput,
        base: usize,
    ) {
        self.gpus
            .shared
            .metrics
            .cpu_fallbacks
            .fetch_add(rows.segs.len() as u64, Ordering::Relaxed);
        let subset: Vec<&dyn Request> = rows.segs.iter().map(|s| requests[s.request]).collect();
        let mut tmp = BatchOutput::default();
        self.cpu.score(model, &subset, &mut tmp);
        let heads = model.num_heads();
        for (i, seg) in rows.segs.iter().enumerate() {
            out.results[base + seg.request] = match tmp.get(i) {
                Ok(s) => {
                    let begin = out.scores.len();
                    out.scores.extend_from_slice(s);
                    if heads > 1 {
                        out.head_at[base + seg.request] = (out.heads.len(), (heads - 1) as u32);
                        for h in 1..heads {
                            if let Some(Ok(v)) = tmp.head(i, h) {
                                out.heads.extend_from_slice(v);
                            }
                        }
                    }
                    Ok(begin..out.scores.len())
                }
                Err(_) => match std::mem::replace(&mut tmp.results[i], Ok(0..0)) {
                    Err(e) => Err(e),
                    Ok(_) => unreachable!("get returned an error"),
                },
            };
        }
    }

    /// [`Self::score`], blocking the thread until the device answers (tools, tests).
    pub fn score_blocking(
        &mut self,
        model: &Arc<Model>,
        requests: &[&dyn Request],
        out: &mut BatchOutput,
    ) {
        futures_executor::block_on(self.score(model, requests, out));
    }
}
