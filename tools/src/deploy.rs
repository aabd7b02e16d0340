//! `rankd-tool deploy`: puts a model file into a model root so that a running `rankd` picks it up
//! atomically. The file is copied into a hidden directory on the same file system and checked
//! on the bytes copied (everything `rankd-tool validate` checks), synced, and the directory is
//! renamed to `ROOT/<name>/<version>`: the daemon never sees a half-copied or corrupt model.
//!
//! The copy reads the source once and bypasses the page cache (`O_DIRECT`) on both sides where
//! the file system allows it. A deploy usually runs beside a daemon that serves requests: a
//! buffered copy would push the whole file through the caches the serving cores share, and the
//! kernel would finish its writeback in worker threads that may run on those cores. With direct
//! I/O a 1 MiB buffer is all that passes through the deploying core, and the writes complete on
//! the deploying thread. The daemon then reads the new file from disk when it opens it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rankd_formats::{Parsed, StreamCheck};

/// Where and when a model was deployed.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The version directory.
    pub dir: PathBuf,
    /// When the rename happened, milliseconds since the Unix epoch.
    pub renamed_at_ms: u128,
}

/// Bytes per read and write: the buffer stays in the deploying core's own cache.
const BLOCK: usize = 1 << 20;
/// Direct I/O wants buffers, offsets and lengths aligned to the device's logical block size;
/// 4 KiB covers every common device.
const DIRECT_ALIGN: usize = 4096;

/// Deploys `file` under `root` (a local directory or an `hdfs://` URL). Name and version default
/// to the file's metadata. Returns where it landed and when it was renamed into place.
pub fn deploy(
    file: &Path,
    root: &Path,
    name: Option<&str>,
    version: Option<u64>,
) -> Result<Deployed> {
    if let Some(n) = name {
        check_name(n)?;
    }
    if let rankd_storage::Location::Hdfs(h) = rankd_storage::Location::from_path(root)? {
        return deploy_hdfs(file, &h, name, version);
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    // The hidden directory sits in the root (on the root's file system; the daemon skips names
    // that start with a dot) until the file's own name and version are known.
    let tmp = root.join(format!(
        ".deploy-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<Deployed> {
        let dst = tmp.join("model.rkm");
        let parsed = copy_checked(file, &dst, true)?;
        File::open(&tmp)?.sync_all()?;
        let name = name.unwrap_or(&parsed.spec.metadata.name).to_owned();
        check_name(&name)?;
        let version = version.unwrap_or(parsed.spec.metadata.version);
        let model_dir = root.join(&name);
        std::fs::create_dir_all(&model_dir)
            .with_context(|| format!("cannot create {}", model_dir.display()))?;
        let target = model_dir.join(version.to_string());
        if target.exists() {
            bail!(
                "{} already exists; versions are immutable, deploy a new one",
                target.display()
            );
        }
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))?;
        let renamed_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        File::open(&model_dir)?.sync_all()?;
        File::open(root)?.sync_all()?;
        Ok(Deployed {
            dir: target,
            renamed_at_ms,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A `Read` that checks a model file on the bytes that pass.
struct Checked<R> {
    inner: R,
    check: StreamCheck,
}

impl<R: std::io::Read> std::io::Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.check
            .update(&buf[..n])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(n)
    }
}

/// The HDFS deploy: upload into a hidden directory of the root, checking the bytes read (a
/// corrupt file fails before the rename), then one rename of that directory to
/// `ROOT/<name>/<version>`, which HDFS refuses when the version exists.
fn deploy_hdfs(
    file: &Path,
    root: &rankd_storage::HdfsPath,
    name: Option<&str>,
    version: Option<u64>,
) -> Result<Deployed> {
    let hdfs = rankd_storage::Hdfs::for_path(root, &rankd_storage::HdfsSettings::default())?;
    let len = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let source = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut checked = Checked {
        inner: std::io::BufReader::with_capacity(BLOCK, source),
        check: StreamCheck::new(len),
    };
    let tmp = rankd_storage::join(
        &root.path,
        &format!(
            ".deploy-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
    );
    let result = (|| -> Result<Deployed> {
        hdfs.write_new(&mut checked, &rankd_storage::join(&tmp, "model.rkm"))?;
        let parsed = std::mem::replace(&mut checked.check, StreamCheck::new(0))
            .finish()
            .with_context(|| format!("{} is not a valid model file", file.display()))?;
        let name = name.unwrap_or(&parsed.spec.metadata.name).to_owned();
        check_name(&name)?;
        let version = version.unwrap_or(parsed.spec.metadata.version);
        let model_dir = rankd_storage::join(&root.path, &name);
        hdfs.mkdirs(&model_dir)?;
        let target = rankd_storage::join(&model_dir, &version.to_string());
        if hdfs.stat(&target)?.is_some() {
            bail!(
                "{}{target} already exists; versions are immutable, deploy a new one",
                root.fs
            );
        }
        hdfs.rename(&tmp, &target, false)
            .with_context(|| format!("cannot rename {tmp} to {target}"))?;
        Ok(Deployed {
            dir: PathBuf::from(format!("{}{target}", root.fs)),
            renamed_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        })
    })();
    if result.is_err() {
        let _ = hdfs.delete(&tmp, true);
    }
    result
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        bail!("invalid model name {name:?}");
    }
    Ok(())
}

/// One side of the copy: direct I/O where the file system takes it, buffered otherwise.
struct Side {
    file: File,
    direct: bool,
}

impl Side {
    fn open(path: &Path, write: bool, direct: bool) -> Result<Side> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            if write {
                o.write(true).create_new(true);
            } else {
                o.read(true);
            }
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        match open(direct) {
            Ok(file) => Ok(Side { file, direct }),
            // tmpfs and some network file systems refuse O_DIRECT.
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => Ok(Side {
                file: open(false).with_context(|| format!("cannot open {}", path.display()))?,
                direct: false,
            }),
            Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
    }
}

/// Copies `src` to the new file `dst` and checks the bytes copied as a model file. `direct`:
/// try direct I/O (tests pass false to cover the buffered path).
fn copy_checked(src: &Path, dst: &Path, direct: bool) -> Result<Parsed> {
    let mut from = Side::open(src, false, direct)?;
    let to = Side::open(dst, true, direct)?;
    let len = from
        .file
        .metadata()
        .with_context(|| format!("cannot stat {}", src.display()))?
        .len();
    let mut check = StreamCheck::new(len);
    let mut raw = vec![0u8; BLOCK + DIRECT_ALIGN];
    let at = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let buf = &mut raw[at..at + BLOCK];
    let mut off = 0u64;
    let mut padded = false;
    while off < len {
        let want = (len - off).min(BLOCK as u64) as usize;
        let rounded = want.next_multiple_of(DIRECT_ALIGN);
        let got = match read_at(&from.file, &mut buf[..rounded], off) {
            Err(e) if from.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // Opened with O_DIRECT but refused at read time (some FUSE file systems).
                from = Side::open(src, false, false)?;
                read_at(&from.file, &mut buf[..rounded], off)
            }
            r => r,
        }
        .with_context(|| format!("cannot read {}", src.display()))?;
        if got < want {
            bail!(
                "{} shrank while being copied ({len} bytes at the start, {} now)",
                src.display(),
                off + got as u64
            );
        }
        check
            .update(&buf[..want])
            .with_context(|| format!("{} is not a valid model", src.display()))?;
        // Direct writes are whole blocks: the last one is padded, and the file cut back after.
        let write = if to.direct && want < rounded {
            buf[want..rounded].fill(0);
            padded = true;
            &buf[..rounded]
        } else {
            &buf[..want]
        };
        to.file
            .write_all_at(write, off)
            .with_context(|| format!("cannot write {}", dst.display()))?;
        off += want as u64;
    }
    if padded {
        to.file.set_len(len)?;
    }
    let parsed = check
        .finish()
        .with_context(|| format!("{} is not a valid model", src.display()))?;
    to.file
        .sync_all()
        .with_context(|| format!("cannot sync {}", dst.display()))?;
    Ok(parsed)
}

/// Reads into `buf` from `off` until it is full or the file ends; returns the bytes read.
fn read_at(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};

    fn model(dir: &Path) -> (PathBuf, Vec<u8>) {
        let path = dir.join("m.rkm");
        write_synthetic(
            &path,
            &SynthOptions {
                kind: ModelKind::DeepFm,
                ..SynthOptions::default()
            },
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    /// Both the direct and the buffered copy give the same bytes, and both refuse a corrupt
    /// file, which in the deploy means the hidden copy is removed.
    #[test]
    fn direct_and_buffered_copies_are_exact_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (src, bytes) = model(dir.path());
        assert!(
            !bytes.len().is_multiple_of(DIRECT_ALIGN),
            "the padded last block is covered"
        );
        for direct in [true, false] {
            let dst = dir.path().join(format!("copy-{direct}.rkm"));
            let parsed = copy_checked(&src, &dst, direct).unwrap();
            assert_eq!(std::fs::read(&dst).unwrap(), bytes, "direct {direct}");
            assert_eq!(parsed.header.file_len, bytes.len() as u64);

            let mut bad = bytes.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            let bad_src = dir.path().join(format!("bad-{direct}.rkm"));
            std::fs::write(&bad_src, &bad).unwrap();
            let e = copy_checked(&bad_src, &dir.path().join(format!("x-{direct}")), direct)
                .unwrap_err();
            assert!(format!("{e:#}").contains("checksum mismatch"), "{e:#}");
        }
    }

    /// A file larger than one block is copied block by block.
    #[test]
    fn multi_block_files_copy_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.rkm");
        write_synthetic(
            &path,
            &SynthOptions {
                kind: ModelKind::WideDeep,
                item_buckets: 100_000,
                ..SynthOptions::default()
            },
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 2 * BLOCK, "{} bytes", bytes.len());
        let dst = dir.path().join("copy.rkm");
        copy_checked(&path, &dst, true).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), bytes);
    }
}
