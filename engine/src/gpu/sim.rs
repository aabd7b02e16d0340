//! The ops of [`super::batch`] run on the host, one plain loop per op, exactly as the CUDA
//! kernels and cuBLAS calls define them. It is the executable contract of the device code:
//! tests run whole GPU batches through it (and through the device worker with it as the
//! executor) on machines without a GPU, and compare with the CPU engine.

use super::batch::{Mat, Op, Sizes, Src, FILL_DESC_WORDS, KIND_DENSE, KIND_MEAN, WIDE_DESC_WORDS};

/// The work space of one batch.
#[derive(Debug, Default)]
pub(crate) struct Work {
    pub x: Vec<f32>,
    pub u: Vec<f32>,
    pub ub: Vec<f32>,
    pub h0: Vec<f32>,
    pub h1: Vec<f32>,
    pub ut: Vec<f32>,
    pub e: Vec<f32>,
    pub m: Vec<f32>,
    pub t: Vec<f32>,
    pub x0: Vec<f32>,
    pub xl: Vec<f32>,
    pub ct: Vec<f32>,
    pub cp: Vec<f32>,
    pub cu: Vec<f32>,
    pub scores: Vec<f32>,
}

const MATS: [Mat; 14] = Mat::ALL;

impl Work {
    fn mat(&self, m: Mat) -> &Vec<f32> {
        match m {
            Mat::X => &self.x,
            Mat::U => &self.u,
            Mat::Ub => &self.ub,
            Mat::H0 => &self.h0,
            Mat::H1 => &self.h1,
            Mat::Ut => &self.ut,
            Mat::E => &self.e,
            Mat::M => &self.m,
            Mat::T => &self.t,
            Mat::X0 => &self.x0,
            Mat::Xl => &self.xl,
            Mat::Ct => &self.ct,
            Mat::Cp => &self.cp,
            Mat::Cu => &self.cu,
        }
    }

    fn mat_mut(&mut self, m: Mat) -> &mut Vec<f32> {
        match m {
            Mat::X => &mut self.x,
            Mat::U => &mut self.u,
            Mat::Ub => &mut self.ub,
            Mat::H0 => &mut self.h0,
            Mat::H1 => &mut self.h1,
            Mat::Ut => &mut self.ut,
            Mat::E => &mut self.e,
            Mat::M => &mut self.m,
            Mat::T => &mut self.t,
            Mat::X0 => &mut self.x0,
            Mat::Xl => &mut self.xl,
            Mat::Ct => &mut self.ct,
            Mat::Cp => &mut self.cp,
            Mat::Cu => &mut self.cu,
        }
    }

    /// Sizes every buffer for `s`, with garbage (NaN) where the ops must write before they
    /// read, so that a missing write shows in the scores.
    fn size(&mut self, s: &Sizes) {
        for m in MATS {
            let v = self.mat_mut(m);
            v.clear();
            v.resize(s.of(m), f32::NAN);
        }
        self.scores.clear();
        self.scores.resize(s.scores(), f32::NAN);
    }
}

/// The weights an op list reads besides the work space.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub arena: &'a [f32],
    pub parts: &'a super::batch::PlanParts<Vec<f32>>,
}

/// The values an operand names.
fn source<'a>(w: &Weights<'a>, work: &'a Work, s: Src) -> &'a [f32] {
    match s {
        Src::Mat(m) => work.mat(m),
        Src::MatAt(m, at) => &work.mat(m)[at as usize..],
        Src::Arena(off) => &w.arena[off as usize..],
        Src::W1Item => &w.parts.w1_item,
        Src::W1User => &w.parts.w1_user,
        Src::C0Item => &w.parts.c0_item,
        Src::C0User => &w.parts.c0_user,
    }
}

fn table(d: &[u32]) -> usize {
    (d[0] as u64 | (d[1] as u64) << 32) as usize
}

/// Runs `ops` over the staging `words`; the scores end in `work.scores`.
pub(crate) fn run(w: Weights<'_>, words: &[u32], ops: &[Op], sizes: &Sizes, work: &mut Work) {
    work.size(sizes);
    for op in ops {
        match *op {
            Op::Fill {
                dst,
                rows,
                width,
                descs_at,
                ndesc,
            } => {
                let mut out = std::mem::take(work.mat_mut(dst));
                for row in 0..rows as usize {
                    for di in 0..ndesc as usize {
                        let d = &words[descs_at as usize + di * FILL_DESC_WORDS..];
                        let (kind, dim, col) = (d[0], d[1] as usize, d[2] as usize);
                        let (offs_at, ids_at) = (d[5] as usize, d[6] as usize);
                        let o = &mut out[row * width as usize + col..];
                        if kind == KIND_DENSE {
                            o[0] = f32::from_bits(words[ids_at + row]);
                            continue;
                        }
                        let t = table(&d[3..]);
                        let (b, e) = (
                            words[offs_at + row] as usize,
                            words[offs_at + row + 1] as usize,
                        );
                        for (j, oj) in o.iter_mut().enumerate().take(dim) {
                            let mut acc = 0f32;
                            for &id in &words[ids_at + b..ids_at + e] {
                                acc += w.arena[t + id as usize * dim + j];
                            }
                            if kind == KIND_MEAN && e - b > 1 {
                                acc /= (e - b) as f32;
                            }
                            *oj = acc;
                        }
                    }
                }
                *work.mat_mut(dst) = out;
            }
            Op::Gemm {
                accumulate,
                transa,
                m,
                n,
                k,
                a,
                lda,
                b,
                ldb,
                c,
                c_at,
                ldc,
            } => {
                let mut whole = std::mem::take(work.mat_mut(c));
                let out = &mut whole[c_at as usize..];
                let (a, b) = (source(&w, work, a), source(&w, work, b));
                let (lda, ldb, ldc) = (lda as usize, ldb as usize, ldc as usize);
                for j in 0..n as usize {
                    for i in 0..m as usize {
                        let mut acc = 0f32;
                        for l in 0..k as usize {
                            let av = if transa {
                                a[l + i * lda]
                            } else {
                                a[i + l * lda]
                            };
                            acc += av * b[l + j * ldb];
                        }
                        let o = &mut out[i + j * ldc];
                        *o = if accumulate { *o + acc } else { acc };
                    }
                }
                *work.mat_mut(c) = whole;
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
                let mut whole = std::mem::take(work.mat_mut(dst));
                let out = &mut whole[dst_at as usize..];
                let bias = source(&w, work, bias);
                let width = width as usize;
                for r in 0..rows as usize {
                    let brow = row_req_at.map_or(0, |at| words[at as usize + r] as usize);
                    for j in 0..width {
                        let v = out[r * width + j] + bias[brow * width + j];
                        out[r * width + j] = if relu { v.max(0.0) } else { v };
                    }
                }
                *work.mat_mut(dst) = whole;
            }
            Op::Relu {
                dst,
                rows,
                width,
                cols,
            } => {
                let out = work.mat_mut(dst);
                for r in 0..rows as usize {
                    for v in &mut out[r * width as usize..][..cols as usize] {
                        *v = v.max(0.0);
                    }
                }
            }
            Op::Mix {
                rows,
                k,
                width,
                gates,
                gate_col,
                gate_ld,
                experts,
                step,
                ld,
                out,
            } => {
                let mut dst = std::mem::take(work.mat_mut(out));
                let (g, x) = (work.mat(gates), work.mat(experts));
                let (k, width) = (k as usize, width as usize);
                for r in 0..rows as usize {
                    let z = &g[r * gate_ld as usize + gate_col as usize..][..k];
                    let max = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
                    let o = &mut dst[r * width..(r + 1) * width];
                    o.fill(0.0);
                    for (e, &zv) in z.iter().enumerate() {
                        let p = (zv - max).exp() / sum;
                        let xe = &x[e * step as usize + r * ld as usize..][..width];
                        for (o, v) in o.iter_mut().zip(xe) {
                            *o += p * v;
                        }
                    }
                }
                *work.mat_mut(out) = dst;
            }
            Op::Scatter {
                rows,
                d,
                x_width,
                u_width,
                cols_at,
                row_req_at,
            } => {
                let (d, xw, uw) = (d as usize, x_width as usize, u_width as usize);
                let cols = &words[cols_at as usize..][..xw + uw];
                for r in 0..rows as usize {
                    let req = words[row_req_at as usize + r] as usize;
                    for (j, &c) in cols.iter().enumerate() {
                        work.x0[r * d + c as usize] = if j < xw {
                            work.x[r * xw + j]
                        } else {
                            work.u[req * uw + j - xw]
                        };
                    }
                }
            }
            Op::CrossUpdate { rows, d, first } => {
                let n = rows as usize * d as usize;
                for i in 0..n {
                    let (x0, t) = (work.x0[i], work.ct[i]);
                    work.xl[i] = if first {
                        x0 + x0 * t
                    } else {
                        work.xl[i] + x0 * t
                    };
                }
            }
            Op::Score { src, rows, at } => {
                for r in 0..rows as usize {
                    work.scores[at as usize + r] = crate::sigmoid(work.mat(src)[r]);
                }
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
                let fm = fm_dim as usize;
                let utw = fm + 2;
                for r in 0..reqs as usize {
                    let mut wide = wide_bias;
                    for wi in 0..nwide as usize {
                        let d = &words[wide_at as usize + wi * WIDE_DESC_WORDS..];
                        let t = table(d);
                        let (offs_at, ids_at) = (d[2] as usize, d[3] as usize);
                        for i in words[offs_at + r]..words[offs_at + r + 1] {
                            wide += w.arena[t + words[ids_at + i as usize] as usize];
                        }
                    }
                    let mut sq = 0f32;
                    let mut sums = vec![0f32; fm];
                    for di in 0..u_ndesc as usize * usize::from(fm > 0) {
                        let d = &words[u_descs_at as usize + di * FILL_DESC_WORDS..];
                        if d[0] == KIND_DENSE {
                            continue;
                        }
                        let col = d[2] as usize;
                        for (dd, s) in sums.iter_mut().enumerate() {
                            let v = work.u[r * u_width as usize + col + dd];
                            *s += v;
                            sq += v * v;
                        }
                    }
                    work.ut[r * utw] = wide;
                    work.ut[r * utw + 1] = sq;
                    work.ut[r * utw + 2..r * utw + 2 + fm].copy_from_slice(&sums);
                }
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
                let fm = fm_dim as usize;
                let utw = fm + 2;
                for row in 0..rows as usize {
                    let req = words[row_req_at as usize + row] as usize;
                    let mut logit = deep.map_or(0.0, |m| work.mat(m)[row]);
                    for wi in 0..nwide as usize {
                        let d = &words[wide_at as usize + wi * WIDE_DESC_WORDS..];
                        let t = table(d);
                        let (offs_at, ids_at) = (d[2] as usize, d[3] as usize);
                        for i in words[offs_at + row]..words[offs_at + row + 1] {
                            logit += w.arena[t + words[ids_at + i as usize] as usize];
                        }
                    }
                    let ut = &work.ut[req * utw..req * utw + utw];
                    logit += ut[0];
                    if fm > 0 {
                        let mut sq = ut[1];
                        let mut total = 0f32;
                        for dd in 0..fm {
                            let mut s = ut[2 + dd];
                            for di in 0..x_ndesc as usize {
                                let d = &words[x_descs_at as usize + di * FILL_DESC_WORDS..];
                                if d[0] == KIND_DENSE {
                                    continue;
                                }
                                let v = work.x[row * x_width as usize + d[2] as usize + dd];
                                s += v;
                                sq += v * v;
                            }
                            total += s * s;
                        }
                        logit += 0.5 * (total - sq);
                    }
                    work.scores[row] = crate::sigmoid(logit);
                }
            }
        }
    }
}

/// A model's weight arena copied to host memory, as an emulated device holds it.
#[derive(Debug)]
pub(crate) struct HostArena(Vec<f32>);

/// Copies models into host arenas.
#[derive(Debug)]
pub(crate) struct HostUploader {
    /// Device memory the emulation pretends to have free (`None`: unlimited).
    pub memory: Option<u64>,
    pub index: usize,
}

impl super::Uploader for HostUploader {
    type Resident = HostArena;

    fn upload(
        &self,
        model: &crate::Model,
        layout: &super::batch::ArenaLayout,
    ) -> Result<HostArena, super::GpuError> {
        if let Some(free) = self.memory {
            super::check_fits(self.index, layout.bytes(), free)?;
        }
        let mut arena = vec![0f32; layout.len as usize];
        for &(at, blob, table) in &layout.blobs {
            let w = match table {
                Some(ei) => model.table_f32(&model.emb[ei]),
                None => std::borrow::Cow::Borrowed(model.weights(blob)),
            };
            arena[at as usize..at as usize + w.len()].copy_from_slice(&w);
        }
        Ok(HostArena(arena))
    }
}

type PlanKey = (u64, usize);

/// A plan kept alive (its address is the key) with its parts.
type HostPlan = (
    std::sync::Arc<crate::plan::Plan>,
    super::batch::PlanParts<Vec<f32>>,
);

/// An emulated device: runs each batch on the host when it is launched, in one of `slots`
/// slots, and can be told to fail the next launch.
#[derive(Debug)]
pub(crate) struct HostExecutor {
    slots: Vec<Work>,
    plans: std::collections::HashMap<PlanKey, HostPlan>,
    fault: Option<super::Fault>,
}

impl HostExecutor {
    pub fn new(slots: usize) -> HostExecutor {
        HostExecutor {
            slots: (0..slots).map(|_| Work::default()).collect(),
            plans: std::collections::HashMap::new(),
            fault: None,
        }
    }
}

impl super::worker::Executor for HostExecutor {
    type Resident = HostArena;

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn launch(
        &mut self,
        slot: usize,
        resident: &HostArena,
        model: &crate::Model,
        plan: &std::sync::Arc<crate::plan::Plan>,
        words: &[u32],
        ops: &[Op],
        sizes: &Sizes,
    ) -> Result<(), super::GpuError> {
        match self.fault.take() {
            Some(super::Fault::Failed) => {
                return Err(super::GpuError::new(
                    super::GpuErrorKind::Failed,
                    "injected fault: launch refused",
                ))
            }
            Some(super::Fault::Lost) => {
                return Err(super::GpuError::new(
                    super::GpuErrorKind::Lost,
                    "injected fault: device lost",
                ))
            }
            None => {}
        }
        let key = (model.id(), std::sync::Arc::as_ptr(plan) as usize);
        let (_, parts) = self.plans.entry(key).or_insert_with(|| {
            // Keeping the plan alive keeps its address a valid key.
            (plan.clone(), super::batch::plan_parts(model, plan))
        });
        let w = Weights {
            arena: &resident.0,
            parts,
        };
        run(w, words, ops, sizes, &mut self.slots[slot]);
        Ok(())
    }

    fn poll(&mut self, _slot: usize) -> Result<bool, super::GpuError> {
        Ok(true)
    }

    fn finish(&mut self, slot: usize) -> Result<&[f32], super::GpuError> {
        Ok(&self.slots[slot].scores)
    }

    fn quiesce(&mut self) {}

    fn forget(&mut self, model_id: u64) {
        self.plans.retain(|k, _| k.0 != model_id);
    }

    fn inject_fault(&mut self, fault: super::Fault) {
        self.fault = Some(fault);
    }
}
