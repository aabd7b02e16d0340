//! `rankd-tool import`: a model config plus a safetensors file of weights trained elsewhere
//! (PyTorch names and layouts, see docs/model.md) become a rankd model file.

use std::path::Path;

use anyhow::{Context, Result};
use rankd_formats::config::{write_model, ModelConfig, Tensors};
use rankd_formats::{FormatError, Metadata, Written};
use safetensors::{Dtype, SafeTensors};

struct SafetensorsWeights<'a>(SafeTensors<'a>);

impl Tensors for SafetensorsWeights<'_> {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.0
            .tensor(name)
            .ok()
            .map(|t| t.shape().iter().map(|&d| d as u64).collect())
    }

    fn names(&self) -> Vec<String> {
        self.0.names().into_iter().map(String::from).collect()
    }

    fn read(
        &self,
        name: &str,
        f: &mut dyn FnMut(&[f32]) -> rankd_formats::Result<()>,
    ) -> rankd_formats::Result<()> {
        let t = self
            .0
            .tensor(name)
            .map_err(|e| FormatError::Config(format!("tensor `{name}`: {e}")))?;
        let mut buf = Vec::with_capacity(1 << 16);
        match t.dtype() {
            Dtype::F32 => {
                for chunk in t.data().chunks(4 << 16) {
                    buf.clear();
                    buf.extend(
                        chunk
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                    f(&buf)?;
                }
            }
            Dtype::F64 => {
                for chunk in t.data().chunks(8 << 16) {
                    buf.clear();
                    buf.extend(
                        chunk
                            .chunks_exact(8)
                            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32),
                    );
                    f(&buf)?;
                }
            }
            other => {
                return Err(FormatError::Config(format!(
                    "tensor `{name}` has dtype {other:?}; import reads F32 and F64"
                )))
            }
        }
        Ok(())
    }
}

/// Options of [`import`].
#[derive(Debug)]
pub struct ImportOptions<'a> {
    /// Model config (TOML).
    pub config: &'a Path,
    /// Weights (safetensors).
    pub weights: &'a Path,
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: u64,
    /// Output model file.
    pub output: &'a Path,
}

/// Builds a model file from a config and a safetensors file.
pub fn import(opts: &ImportOptions<'_>) -> Result<Written> {
    let text = std::fs::read_to_string(opts.config)
        .with_context(|| format!("cannot read {}", opts.config.display()))?;
    let config = ModelConfig::from_toml(&text, &["train"])
        .with_context(|| format!("in {}", opts.config.display()))?;
    let file = std::fs::File::open(opts.weights)
        .with_context(|| format!("cannot open {}", opts.weights.display()))?;
    // SAFETY: read-only map of an input file that this process does not modify; a concurrent
    // writer could only change the weights imported, which the checksum of the output records.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", opts.weights.display()))?;
    let st = SafeTensors::deserialize(&map)
        .with_context(|| format!("{} is not a safetensors file", opts.weights.display()))?;
    let metadata = Metadata {
        name: opts.name.clone(),
        version: opts.version,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        producer: format!("rankd-tool import {}", env!("CARGO_PKG_VERSION")),
        metrics: vec![],
        properties: vec![(
            "imported_from".into(),
            opts.weights
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )],
    };
    let written = write_model(&config, metadata, &SafetensorsWeights(st), opts.output)
        .with_context(|| {
            format!(
                "{} against {}",
                opts.weights.display(),
                opts.config.display()
            )
        })?;
    Ok(written)
}
