//! Checkpoints: parameters, optimizer state, the epoch and the shuffling state, so that
//! `--resume` continues exactly where a run stopped (same result as an uninterrupted run).
//!
//! Layout: magic `RKDCKPT1`, epochs done (u64), shuffle state (u64), best eval AUC (f64), best
//! epoch (u64), then every tensor as a u64 element count and little-endian f32 values, in the
//! order of [`crate::model::Params::tensors_mut`] followed by the optimizer's. Written to a
//! temporary file and renamed, so a crash never leaves a torn checkpoint.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Result, TrainError};
use crate::model::{Optimizer, Params};

const MAGIC: &[u8; 8] = b"RKDCKPT1";

/// Where a run stood.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Position {
    /// Epochs completed.
    pub epochs_done: u64,
    /// The shuffling generator's state.
    pub rng_state: u64,
    /// Best eval AUC so far.
    pub best_auc: f64,
    /// The epoch of the best AUC.
    pub best_epoch: u64,
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Data(format!("checkpoint {}: {e}", path.display()))
}

/// Writes a checkpoint.
pub fn save(path: &Path, pos: Position, params: &mut Params, opt: &mut Optimizer) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?);
    let mut w = |b: &[u8]| out.write_all(b).map_err(|e| io(&tmp, e));
    w(MAGIC)?;
    w(&pos.epochs_done.to_le_bytes())?;
    w(&pos.rng_state.to_le_bytes())?;
    w(&pos.best_auc.to_le_bytes())?;
    w(&pos.best_epoch.to_le_bytes())?;
    for t in params.tensors_mut().into_iter().chain(opt.tensors_mut()) {
        w(&(t.len() as u64).to_le_bytes())?;
        for v in t.iter() {
            w(&v.to_le_bytes())?;
        }
    }
    let file = out.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    Ok(())
}

/// Reads a checkpoint into `params` and `opt`, whose shapes must match.
pub fn load(path: &Path, params: &mut Params, opt: &mut Optimizer) -> Result<Position> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io(path, e))?;
    let bad = |m: &str| TrainError::Data(format!("checkpoint {}: {m}", path.display()));
    if bytes.len() < 40 || &bytes[..8] != MAGIC {
        return Err(bad("not a rankd-train checkpoint"));
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let pos = Position {
        epochs_done: u64_at(8),
        rng_state: u64_at(16),
        best_auc: f64::from_bits(u64_at(24)),
        best_epoch: u64_at(32),
    };
    let mut at = 40;
    for t in params.tensors_mut().into_iter().chain(opt.tensors_mut()) {
        if at + 8 > bytes.len() {
            return Err(bad("truncated"));
        }
        let n = u64_at(at) as usize;
        at += 8;
        if n != t.len() || at + 4 * n > bytes.len() {
            return Err(bad("does not match this model config (or is truncated)"));
        }
        for (i, v) in t.iter_mut().enumerate() {
            let b = &bytes[at + 4 * i..at + 4 * i + 4];
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        at += 4 * n;
    }
    if at != bytes.len() {
        return Err(bad("has trailing bytes"));
    }
    Ok(pos)
}

/// [`save`] to a local path or an `hdfs://` one (written locally, then uploaded under a hidden
/// name and renamed into place).
pub fn save_at(
    path: &Path,
    pos: Position,
    params: &mut Params,
    opt: &mut Optimizer,
    hdfs: &rankd_storage::HdfsSettings,
) -> Result<()> {
    if !rankd_storage::Location::is_hdfs(path) {
        return save(path, pos, params, opt);
    }
    let dir = tempfile::tempdir().map_err(|e| io(path, e))?;
    let local = dir.path().join("checkpoint");
    save(&local, pos, params, opt)?;
    rankd_storage::put_file(&local, path, hdfs)
        .map_err(|e| TrainError::Data(format!("checkpoint: {e}")))?;
    Ok(())
}

/// [`load`] from a local path or an `hdfs://` one; `None` when there is no checkpoint there.
pub fn load_at(
    path: &Path,
    params: &mut Params,
    opt: &mut Optimizer,
    hdfs: &rankd_storage::HdfsSettings,
) -> Result<Option<Position>> {
    let there = rankd_storage::exists(path, hdfs)
        .map_err(|e| TrainError::Data(format!("checkpoint: {e}")))?;
    if !there {
        return Ok(None);
    }
    if !rankd_storage::Location::is_hdfs(path) {
        return load(path, params, opt).map(Some);
    }
    let dir = tempfile::tempdir().map_err(|e| io(path, e))?;
    let local = dir.path().join("checkpoint");
    rankd_storage::get_file(path, &local, hdfs)
        .map_err(|e| TrainError::Data(format!("checkpoint: {e}")))?;
    load(&local, params, opt).map(Some)
}
