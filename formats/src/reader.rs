//! Opening model files: read-only memory map, header, checksum, FlatBuffers verifier, invariants.
//! After [`ModelFile::open`] returns, weights are read as `&[f32]` straight from the map.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rankd_feature_ops::CompiledSpec;

use crate::error::{FormatError, Result};
use crate::gen::rankd::fb;
use crate::layout::{
    body_checksum, body_checksum_paced, default_threads, BodyHasher, Header, HEADER_LEN,
};
use crate::spec::{BlobRef, ModelSpec};
use crate::{fbconv, validate};

/// Whether the body checksum was verified when the file was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    /// Every byte was hashed and matched the stored checksum.
    Verified,
    /// Skipped through [`ModelFile::open_trusted`].
    Trusted,
}

/// The header, spec and compiled feature spec of a model, checked.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The header.
    pub header: Header,
    /// The decoded description.
    pub spec: ModelSpec,
    /// The compiled feature spec.
    pub compiled: CompiledSpec,
}

fn verifier_options() -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 64,
        // Vocabularies of millions of entries are normal; the 2 GiB size cap bounds the work.
        max_tables: 1 << 31,
        max_apparent_size: 1 << 31,
        ignore_missing_null_terminator: false,
    }
}

/// Checks a whole model file held in memory: everything [`ModelFile::open`] checks.
pub fn parse(bytes: &[u8]) -> Result<Parsed> {
    parse_inner(bytes, Some(Verify::threads(default_threads())))
}

/// How [`ModelFile::open_with`] verifies the body checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verify {
    /// Threads that hash (ignored when paced: pacing hashes on the caller's thread).
    pub threads: usize,
    /// Average bytes per second to read at most; `None` for as fast as possible.
    pub max_bytes_per_sec: Option<u64>,
}

impl Verify {
    /// As fast as possible on `threads` threads.
    pub fn threads(threads: usize) -> Verify {
        Verify {
            threads: threads.max(1),
            max_bytes_per_sec: None,
        }
    }
}

/// `verify`: how to check the body checksum, or `None` to skip the checksum and the FlatBuffers
/// verifier.
fn parse_inner(bytes: &[u8], verify: Option<Verify>) -> Result<Parsed> {
    let header = Header::decode(bytes, bytes.len() as u64)?;
    if let Some(v) = verify {
        let computed = match v.max_bytes_per_sec {
            Some(rate) => body_checksum_paced(bytes, header.chunk_log2, rate),
            None => body_checksum(bytes, header.chunk_log2, v.threads),
        };
        if computed != header.body_checksum {
            return Err(FormatError::Checksum {
                part: "body",
                stored: header.body_checksum,
                computed,
            });
        }
    }
    // Header::decode checked that the section lies inside the file.
    let meta = &bytes[header.meta_offset as usize..(header.meta_offset + header.meta_len) as usize];
    parse_meta(header, meta, verify.is_some())
}

/// The second half of every parse: the metadata section of a file whose `header` is checked.
/// `verified`: run the FlatBuffers verifier (false only on the trusted path).
fn parse_meta(header: Header, meta: &[u8], verified: bool) -> Result<Parsed> {
    if meta.len() < 8 || !fb::model_buffer_has_identifier(meta) {
        return Err(FormatError::Invalid(
            "metadata section lacks the \"RKM1\" identifier".into(),
        ));
    }
    let model = if verified {
        fb::root_as_model_with_opts(&verifier_options(), meta)?
    } else {
        // SAFETY: only reached from `open_trusted`, whose caller guarantees the file passed
        // full verification before and has not changed since.
        unsafe { fb::root_as_model_unchecked(meta) }
    };
    let spec = fbconv::decode(model)?;
    if header.version < spec.format_version() {
        return Err(FormatError::Invalid(format!(
            "the file says format version {} but holds f16 or int8 tables, which need version {}",
            header.version,
            spec.format_version()
        )));
    }
    let compiled = validate::validate(&spec, header.meta_offset)?;
    Ok(Parsed {
        header,
        spec,
        compiled,
    })
}

/// Checks a model file whose bytes go past once, in order: everything [`ModelFile::open`]
/// checks, on exactly the bytes seen. A copy that validates what it writes (`rankd-tool deploy`)
/// reads its source once and never through a memory map.
///
/// ```text
/// let mut check = StreamCheck::new(len);
/// for block in blocks { check.update(block)?; }
/// let parsed = check.finish()?;
/// ```
#[derive(Debug)]
pub struct StreamCheck {
    len: u64,
    seen: u64,
    head: Vec<u8>,
    header: Option<Header>,
    hasher: Option<BodyHasher>,
    meta: Vec<u8>,
}

impl StreamCheck {
    /// A check of a file of `len` bytes.
    pub fn new(len: u64) -> StreamCheck {
        StreamCheck {
            len,
            seen: 0,
            head: Vec::with_capacity(HEADER_LEN),
            header: None,
            hasher: None,
            meta: Vec::new(),
        }
    }

    /// The next bytes of the file. Fails as soon as the header is complete and wrong, or when
    /// more bytes arrive than the file's length.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<()> {
        if self.seen + bytes.len() as u64 > self.len {
            return Err(FormatError::Invalid(format!(
                "the file grew past its {} bytes while being read",
                self.len
            )));
        }
        if self.header.is_none() {
            let take = bytes.len().min(HEADER_LEN - self.head.len());
            self.head.extend_from_slice(&bytes[..take]);
            self.seen += take as u64;
            bytes = &bytes[take..];
            if self.head.len() < HEADER_LEN {
                return Ok(());
            }
            let header = Header::decode(&self.head, self.len)?;
            self.hasher = Some(BodyHasher::new(header.chunk_log2));
            self.meta = Vec::with_capacity(header.meta_len as usize);
            self.header = Some(header);
        }
        let (Some(header), Some(hasher)) = (&self.header, &mut self.hasher) else {
            unreachable!("set together above");
        };
        hasher.update(bytes);
        // The part of `bytes` that falls inside the metadata section.
        let (start, end) = (self.seen, self.seen + bytes.len() as u64);
        let (m0, m1) = (header.meta_offset, header.meta_offset + header.meta_len);
        if start < m1 && end > m0 {
            let a = (m0.max(start) - start) as usize;
            let b = (m1.min(end) - start) as usize;
            self.meta.extend_from_slice(&bytes[a..b]);
        }
        self.seen = end;
        Ok(())
    }

    /// Checks what was seen: the whole file, its body checksum, the FlatBuffers verifier and
    /// the format's invariants.
    pub fn finish(self) -> Result<Parsed> {
        let (Some(header), Some(hasher)) = (self.header, self.hasher) else {
            return Err(FormatError::Truncated(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                self.seen
            )));
        };
        if self.seen != self.len {
            return Err(FormatError::Truncated(format!(
                "read {} of {} bytes",
                self.seen, self.len
            )));
        }
        let computed = hasher.finish();
        if computed != header.body_checksum {
            return Err(FormatError::Checksum {
                part: "body",
                stored: header.body_checksum,
                computed,
            });
        }
        parse_meta(header, &self.meta, true)
    }
}

/// An open model file. Share it through `Arc`: it unmaps when the last holder drops it.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    map: Mmap,
    parsed: Parsed,
    integrity: Integrity,
}

impl ModelFile {
    /// Opens and fully validates a model file: header, body checksum (on every core), FlatBuffers
    /// verifier, then the format's invariants.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile> {
        Self::open_with(path.as_ref(), Some(Verify::threads(default_threads())))
    }

    /// Like [`ModelFile::open`], verifying as `verify` says: a daemon reloading in the background
    /// hashes on one thread at a bounded pace, so that the cores serving requests are left
    /// alone.
    pub fn open_verified(path: impl AsRef<Path>, verify: Verify) -> Result<ModelFile> {
        Self::open_with(path.as_ref(), Some(verify))
    }

    /// Opens a model file without the body checksum and without the FlatBuffers verifier; the
    /// header checksum and the invariants (shapes, blob placement) are still checked.
    ///
    /// Verifying the checksum reads every byte of the file, which for a table of tens of GiB
    /// takes seconds and pulls it all into the page cache; this path exists for daemons that
    /// reopen a file they (or a deploy step) already verified.
    ///
    /// # Safety
    /// The file must be byte-for-byte one that [`ModelFile::open`] (or `rankd-tool validate`)
    /// accepted, unchanged since. A corrupt metadata section read without the verifier is
    /// undefined behaviour.
    pub unsafe fn open_trusted(path: impl AsRef<Path>) -> Result<ModelFile> {
        Self::open_with(path.as_ref(), None)
    }

    fn open_with(path: &Path, verify: Option<Verify>) -> Result<ModelFile> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
        if len < HEADER_LEN as u64 {
            return Err(FormatError::Truncated(format!(
                "{len} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        // SAFETY: model files are immutable once deployed: writers create new files under new
        // names and rename them into place, never modify a served file in place. The map is
        // read-only.
        // Verifying reads every byte: prefault the whole map in one call instead of one page
        // fault per page. A paced check is left to fault the file in at its pace: populating
        // would read a file that is not in the page cache from disk at full speed first.
        let map = unsafe {
            let mut options = memmap2::MmapOptions::new();
            if verify.is_some_and(|v| v.max_bytes_per_sec.is_none()) {
                options.populate();
            }
            options.map(&file)
        }
        .map_err(|e| FormatError::io(path, e))?;
        let parsed = parse_inner(&map, verify)?;
        Ok(ModelFile {
            path: path.to_path_buf(),
            map,
            parsed,
            integrity: if verify.is_some() {
                Integrity::Verified
            } else {
                Integrity::Trusted
            },
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's description.
    pub fn spec(&self) -> &ModelSpec {
        &self.parsed.spec
    }

    /// The compiled feature spec.
    pub fn compiled(&self) -> &CompiledSpec {
        &self.parsed.compiled
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.parsed.header
    }

    /// Whether the checksum was verified.
    pub fn integrity(&self) -> Integrity {
        self.integrity
    }

    /// Bytes mapped.
    pub fn mapped_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The values of a blob, read in place from the map. `None` if the reference is not inside
    /// the blob region (never the case for references taken from [`Self::spec`]).
    pub fn blob(&self, b: BlobRef) -> Option<&[f32]> {
        let start = usize::try_from(b.offset).ok()?;
        let end = start.checked_add(usize::try_from(b.byte_len()?).ok()?)?;
        if start < HEADER_LEN || end as u64 > self.parsed.header.meta_offset {
            return None;
        }
        let bytes = self.map.get(start..end)?;
        #[cfg(target_endian = "little")]
        {
            bytemuck::try_cast_slice(bytes).ok()
        }
        #[cfg(target_endian = "big")]
        compile_error!("rankd model files are little-endian and read in place");
    }

    /// Like [`Self::blob`] for references from [`Self::spec`], which were validated at open.
    pub fn weights(&self, b: BlobRef) -> &[f32] {
        self.blob(b)
            .expect("blob references from the spec were validated at open")
    }

    /// The values of an int8 blob (an [`crate::WeightType::I8`] table): `4 * b.len` bytes (the
    /// last ones padding when the table's value count is not a multiple of 4).
    pub fn weights_i8(&self, b: BlobRef) -> &[i8] {
        bytemuck::cast_slice(self.weights(b))
    }

    /// The values of an f16 blob (an [`crate::WeightType::F16`] table), as IEEE 754 binary16
    /// bit patterns: `2 * b.len` of them (the last one padding when the table's value count is
    /// odd).
    pub fn weights_f16(&self, b: BlobRef) -> &[u16] {
        bytemuck::cast_slice(self.weights(b))
    }
}
