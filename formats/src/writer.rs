//! Writing model files: blobs first (streamed, so a table larger than memory is fine), then the
//! metadata FlatBuffer, then the header with its checksums.
//!
//! The file is written as `<path>.partial` and renamed into place only after it is complete and
//! synced, so a crash never leaves a half-written model under the final name.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};
use crate::layout::{
    align_up, body_checksum, default_threads, Header, DEFAULT_CHUNK_LOG2, HEADER_LEN, MAX_META_LEN,
};
use crate::spec::{BlobRef, ModelSpec};
use crate::{fbconv, validate};

/// What [`ModelWriter::finish`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// File length in bytes.
    pub file_len: u64,
    /// Body checksum stored in the header.
    pub body_checksum: u64,
}

/// Writes one model file.
#[derive(Debug)]
pub struct ModelWriter {
    path: PathBuf,
    partial: PathBuf,
    file: Option<BufWriter<File>>,
    pos: u64,
}

impl ModelWriter {
    /// Starts a model file at `path` (written as `<path>.partial` until [`Self::finish`]).
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        // Read access too: `finish` maps the file to compute the checksum.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| FormatError::io(&partial, e))?;
        let mut w = ModelWriter {
            path,
            partial,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            pos: 0,
        };
        w.write_bytes(&[0u8; HEADER_LEN])?;
        Ok(w)
    }

    fn out(&mut self) -> &mut BufWriter<File> {
        self.file.as_mut().expect("file is present until finish")
    }

    fn write_bytes(&mut self, b: &[u8]) -> Result<()> {
        let partial = self.partial.clone();
        self.out()
            .write_all(b)
            .map_err(|e| FormatError::io(&partial, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let target = align_up(self.pos);
        let zeros = [0u8; 64];
        self.write_bytes(&zeros[..(target - self.pos) as usize])
    }

    /// Writes `data` as one blob and returns its reference.
    pub fn write_blob(&mut self, data: &[f32]) -> Result<BlobRef> {
        let mut sink = self.blob()?;
        sink.write(data)?;
        Ok(sink.finish())
    }

    /// Starts a blob written piece by piece.
    pub fn blob(&mut self) -> Result<BlobSink<'_>> {
        self.pad()?;
        let offset = self.pos;
        Ok(BlobSink {
            writer: self,
            offset,
            len: 0,
        })
    }

    /// Validates `spec` against the blobs written, writes the metadata and header, syncs, and
    /// renames the file into place.
    pub fn finish(mut self, spec: &ModelSpec) -> Result<Written> {
        self.pad()?;
        let meta_offset = self.pos;
        validate::validate(spec, meta_offset)?;
        let meta = fbconv::encode(spec);
        if meta.len() as u64 > MAX_META_LEN {
            return Err(FormatError::Invalid(format!(
                "metadata is {} bytes, over the FlatBuffers limit of 2 GiB; move large \
                 vocabularies out of the spec",
                meta.len()
            )));
        }
        self.write_bytes(&meta)?;
        let file_len = self.pos;
        let partial = self.partial.clone();
        let io = |e| FormatError::io(&partial, e);
        let file = self
            .file
            .take()
            .expect("file is present until finish")
            .into_inner()
            .map_err(|e| io(e.into_error()))?;
        file.set_len(file_len).map_err(io)?;
        let body_checksum = {
            // SAFETY: the file is ours (just created under a private name) and nobody else
            // writes it while this read-only map lives.
            let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(io)?;
            body_checksum(&map, DEFAULT_CHUNK_LOG2, default_threads())
        };
        let header = Header {
            version: spec.format_version(),
            chunk_log2: DEFAULT_CHUNK_LOG2,
            file_len,
            meta_offset,
            meta_len: meta.len() as u64,
            body_checksum,
        };
        let mut file = file;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header.encode()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| FormatError::io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Best effort: make the rename durable. Not every file system allows opening a
            // directory for sync.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Written {
            file_len,
            body_checksum,
        })
    }
}

impl Drop for ModelWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.partial.exists() {
            self.file = None;
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// A blob being written; see [`ModelWriter::blob`].
#[derive(Debug)]
pub struct BlobSink<'w> {
    writer: &'w mut ModelWriter,
    offset: u64,
    len: u64,
}

impl<'w> BlobSink<'w> {
    /// Appends values.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        #[cfg(target_endian = "little")]
        self.writer.write_bytes(bytemuck::cast_slice(data))?;
        #[cfg(target_endian = "big")]
        for v in data {
            self.writer.write_bytes(&v.to_le_bytes())?;
        }
        self.len += data.len() as u64;
        Ok(())
    }

    /// Appends `n` zeros without writing them (a hole in a sparse file where the file system
    /// supports it). Meant for tests of very large tables and for zero-initialized tables.
    pub fn skip_zeros(&mut self, n: u64) -> Result<()> {
        let bytes = n
            .checked_mul(4)
            .ok_or_else(|| FormatError::Invalid("blob length overflows".into()))?;
        let partial = self.writer.partial.clone();
        self.writer
            .out()
            .seek(SeekFrom::Current(bytes as i64))
            .map_err(|e| FormatError::io(&partial, e))?;
        self.writer.pos += bytes;
        self.len += n;
        Ok(())
    }

    /// Ends the blob and returns its reference.
    pub fn finish(self) -> BlobRef {
        BlobRef {
            offset: self.offset,
            len: self.len,
        }
    }

    /// Turns this blob into one of int8 values with a scale per row of `dim` values (an int8
    /// embedding table).
    pub fn int8(self, dim: usize) -> I8Sink<'w> {
        I8Sink {
            sink: self,
            dim: dim.max(1),
            row: Vec::new(),
            bytes: 0,
            scales: Vec::new(),
            q: Vec::new(),
        }
    }

    /// Turns this blob into one of f16 values (an f16 embedding table).
    pub fn f16(self) -> F16Sink<'w> {
        F16Sink {
            sink: self,
            odd: None,
            buf: Vec::new(),
        }
    }
}

/// The int8 form of one row: `scale` = the largest magnitude / 127 (0 for a zero row) and each
/// value `round(x / scale)` (half away from zero), so that `q * scale` is within `scale / 2` of
/// `x`. The trainer and the writer share it, so the trainer evaluates what the file will hold.
pub fn quantize_row(row: &[f32], q: &mut Vec<i8>) -> f32 {
    let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    q.clear();
    if max == 0.0 || !max.is_finite() {
        q.resize(row.len(), 0);
        return 0.0;
    }
    let scale = max / 127.0;
    q.extend(
        row.iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8),
    );
    scale
}

/// A blob of int8 values written from f32 rows; see [`BlobSink::int8`]. The per-row scales are
/// kept in memory (4 bytes per row) and returned by [`I8Sink::finish`] to be written as a blob of
/// their own.
#[derive(Debug)]
pub struct I8Sink<'w> {
    sink: BlobSink<'w>,
    dim: usize,
    /// Values of a row not complete yet.
    row: Vec<f32>,
    bytes: u64,
    scales: Vec<f32>,
    q: Vec<i8>,
}

impl I8Sink<'_> {
    /// Appends values (rows may span calls).
    pub fn write(&mut self, mut data: &[f32]) -> Result<()> {
        while !data.is_empty() {
            let take = (self.dim - self.row.len()).min(data.len());
            self.row.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.row.len() == self.dim {
                let scale = quantize_row(&self.row, &mut self.q);
                self.scales.push(scale);
                self.sink
                    .writer
                    .write_bytes(bytemuck::cast_slice(&self.q))?;
                self.bytes += self.q.len() as u64;
                self.row.clear();
            }
        }
        Ok(())
    }

    /// Ends the blob (padded with zero bytes to whole words); returns its reference and the
    /// rows' scales.
    pub fn finish(mut self) -> Result<(BlobRef, Vec<f32>)> {
        if !self.row.is_empty() {
            return Err(FormatError::Invalid(format!(
                "an int8 table ended inside a row ({} of {} values)",
                self.row.len(),
                self.dim
            )));
        }
        let pad = (4 - self.bytes % 4) % 4;
        self.sink.writer.write_bytes(&[0u8; 3][..pad as usize])?;
        self.sink.len = (self.bytes + pad) / 4;
        Ok((self.sink.finish(), self.scales))
    }
}

/// A blob of f16 values written from f32 ones (rounded to nearest, ties to even), two per
/// word; see [`BlobSink::f16`].
#[derive(Debug)]
pub struct F16Sink<'w> {
    sink: BlobSink<'w>,
    /// A value waiting for its word's second half.
    odd: Option<u16>,
    buf: Vec<u16>,
}

impl F16Sink<'_> {
    /// Appends values.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        use half::slice::HalfFloatSliceExt;
        self.buf.clear();
        self.buf.extend(self.odd.take());
        let at = self.buf.len();
        self.buf.resize(at + data.len(), 0);
        let halves: &mut [half::f16] = bytemuck::cast_slice_mut(&mut self.buf[at..]);
        halves.convert_from_f32_slice(data);
        if self.buf.len() % 2 == 1 {
            self.odd = self.buf.pop();
        }
        self.write_halves()
    }

    fn write_halves(&mut self) -> Result<()> {
        let words = self.buf.len() / 2;
        #[cfg(target_endian = "little")]
        self.sink
            .writer
            .write_bytes(bytemuck::cast_slice(&self.buf))?;
        #[cfg(target_endian = "big")]
        for v in &self.buf {
            self.sink.writer.write_bytes(&v.to_le_bytes())?;
        }
        self.sink.len += words as u64;
        Ok(())
    }

    /// Ends the blob (an odd last value is padded with a zero half) and returns its reference.
    pub fn finish(mut self) -> Result<BlobRef> {
        if let Some(v) = self.odd.take() {
            self.buf.clear();
            self.buf.extend([v, 0]);
            self.write_halves()?;
        }
        Ok(self.sink.finish())
    }
}
