//! Where model files and data live: a local path or an `hdfs://` URL ([`Location`]), and a
//! blocking HDFS client with a deadline on every call ([`Hdfs`]).
//!
//! hdfs-native is asynchronous and has no timeout of its own for a NameNode that accepts
//! connections and never answers; its retry policy takes minutes to give up on a dead one. Every
//! call here runs on a small tokio runtime owned by the client, under [`HdfsSettings::timeout`]
//! (a download or upload: under that timeout per chunk, so a large file may take as long as it
//! needs while a stalled one fails), with the failover retries lowered unless configured.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod kafka;

use bytes::Bytes;
use futures::StreamExt;

/// A storage error, naming the location and the operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A URL with a scheme rankd does not read.
    #[error("`{0}`: unsupported scheme (rankd reads local paths and hdfs:// URLs)")]
    UnsupportedScheme(String),
    /// A malformed `hdfs://` URL.
    #[error("`{url}`: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// An HDFS call failed.
    #[error("hdfs {op} {path}: {message}")]
    Hdfs {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// hdfs-native's message.
        message: String,
    },
    /// An HDFS call did not finish in time.
    #[error("hdfs {op} {path}: no answer within {ms} ms")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// The limit.
        ms: u128,
    },
    /// A target that must not exist does.
    #[error("{0} exists already")]
    Exists(String),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Local {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A Kafka call failed.
    #[error("kafka {op} {topic}: {message}")]
    Kafka {
        /// The operation.
        op: &'static str,
        /// The topic's URL.
        topic: String,
        /// The client's message.
        message: String,
    },
    /// The consumer of a download refused the bytes (e.g. a checksum mismatch).
    #[error("{path}: {message}")]
    Rejected {
        /// The path.
        path: String,
        /// Why.
        message: String,
    },
}

/// Result with [`StorageError`].
pub type Result<T> = std::result::Result<T, StorageError>;

/// A location given by a user: a local path, or an `hdfs://authority/path` URL (the authority is
/// a NameNode `host:port` or an HA nameservice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local path.
    Local(PathBuf),
    /// A path on HDFS.
    Hdfs(HdfsPath),
}

/// A parsed `hdfs://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HdfsPath {
    /// `hdfs://authority`, what the client connects to.
    pub fs: String,
    /// The absolute path inside it, `/` at least, without a trailing `/`.
    pub path: String,
}

impl HdfsPath {
    /// The full URL.
    pub fn url(&self) -> String {
        format!("{}{}", self.fs, self.path)
    }

    /// A child of this path.
    pub fn join(&self, name: &str) -> HdfsPath {
        HdfsPath {
            fs: self.fs.clone(),
            path: join(&self.path, name),
        }
    }
}

/// `dir/name` for HDFS paths.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Location {
    /// Parses a user's path: `hdfs://...` is HDFS, any other `scheme://` is refused, anything
    /// else is a local path.
    pub fn parse(s: &str) -> Result<Location> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(s)));
        };
        let plausible_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !plausible_scheme {
            return Ok(Location::Local(PathBuf::from(s)));
        }
        if !scheme.eq_ignore_ascii_case("hdfs") {
            return Err(StorageError::UnsupportedScheme(s.to_owned()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(StorageError::BadUrl {
                url: s.to_owned(),
                reason: "no NameNode or nameservice after hdfs://".into(),
            });
        }
        let mut path = path.trim_end_matches('/').to_owned();
        if path.is_empty() {
            path.push('/');
        }
        Ok(Location::Hdfs(HdfsPath {
            fs: format!("hdfs://{authority}"),
            path,
        }))
    }

    /// Parses a path given as a `Path` (from a config or the command line).
    pub fn from_path(p: &Path) -> Result<Location> {
        match p.to_str() {
            Some(s) => Location::parse(s),
            None => Ok(Location::Local(p.to_path_buf())),
        }
    }

    /// Whether a path names HDFS.
    pub fn is_hdfs(p: &Path) -> bool {
        matches!(Location::from_path(p), Ok(Location::Hdfs(_)))
    }
}

/// Client settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HdfsSettings {
    /// Deadline of each NameNode call, and of each chunk of a transfer.
    pub timeout: Duration,
    /// Hadoop settings passed to hdfs-native (`dfs.nameservices`, `dfs.ha.namenodes.*`,
    /// `dfs.namenode.rpc-address.*`, ...). They win over `HADOOP_CONF_DIR`'s files.
    pub config: BTreeMap<String, String>,
}

impl Default for HdfsSettings {
    fn default() -> Self {
        HdfsSettings {
            timeout: Duration::from_secs(10),
            config: BTreeMap::new(),
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The last path component.
    pub name: String,
    /// The absolute path.
    pub path: String,
    /// A directory.
    pub is_dir: bool,
    /// Length in bytes (0 for directories).
    pub len: u64,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: u64,
}

impl Entry {
    fn from_status(s: hdfs_native::client::FileStatus) -> Entry {
        let name = s.path.rsplit('/').next().unwrap_or("").to_owned();
        Entry {
            name,
            path: s.path,
            is_dir: s.isdir,
            len: s.length as u64,
            mtime_ms: s.modification_time,
        }
    }
}

/// A blocking HDFS client bound to one file system (`hdfs://authority`).
pub struct Hdfs {
    runtime: tokio::runtime::Runtime,
    client: hdfs_native::Client,
    fs: String,
    timeout: Duration,
}

impl std::fmt::Debug for Hdfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hdfs")
            .field("fs", &self.fs)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Settings lowered from Hadoop's defaults unless the user gives them: with the defaults a call
/// to a dead NameNode retries for minutes, far past any deadline here.
const QUICK_FAILOVER: [(&str, &str); 4] = [
    ("dfs.client.failover.max.attempts", "3"),
    ("dfs.client.failover.sleep.base.millis", "100"),
    ("dfs.client.failover.sleep.max.millis", "1000"),
    ("dfs.client.retry.max.attempts", "2"),
];

fn hdfs_err(op: &'static str, path: &str, e: hdfs_native::HdfsError) -> StorageError {
    StorageError::Hdfs {
        op,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

impl Hdfs {
    /// A client for the file system of `fs` (`hdfs://authority`). Connections are made lazily:
    /// an unreachable NameNode fails the first call, not this one.
    pub fn connect(fs: &str, settings: &HdfsSettings) -> Result<Hdfs> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rankd-hdfs")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Local {
                path: "tokio runtime".into(),
                source: e,
            })?;
        let mut config: BTreeMap<String, String> = QUICK_FAILOVER
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        config.extend(settings.config.clone());
        let client = hdfs_native::ClientBuilder::new()
            .with_url(fs)
            .with_config(config)
            .with_io_runtime(runtime.handle().clone())
            .build()
            .map_err(|e| hdfs_err("connect", fs, e))?;
        Ok(Hdfs {
            runtime,
            client,
            fs: fs.to_owned(),
            timeout: settings.timeout,
        })
    }

    /// The process's client for the file system of `p` with `settings`, made on first use and
    /// shared after that: each client owns a runtime with its threads and its NameNode
    /// connections, so a trainer reading many files, or a tool copying one, makes one.
    pub fn for_path(p: &HdfsPath, settings: &HdfsSettings) -> Result<std::sync::Arc<Hdfs>> {
        type Clients = std::collections::HashMap<(String, HdfsSettings), std::sync::Arc<Hdfs>>;
        static CLIENTS: std::sync::OnceLock<std::sync::Mutex<Clients>> = std::sync::OnceLock::new();
        let mut clients = CLIENTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (p.fs.clone(), settings.clone());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = std::sync::Arc::new(Hdfs::connect(&p.fs, settings)?);
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// The file system this client is bound to.
    pub fn fs(&self) -> &str {
        &self.fs
    }

    fn call<T>(
        &self,
        op: &'static str,
        path: &str,
        f: impl Future<Output = std::result::Result<T, hdfs_native::HdfsError>>,
    ) -> Result<T> {
        let timeout = self.timeout;
        self.runtime.block_on(async move {
            match tokio::time::timeout(timeout, f).await {
                Ok(r) => r.map_err(|e| hdfs_err(op, path, e)),
                Err(_) => Err(StorageError::Timeout {
                    op,
                    path: path.to_owned(),
                    ms: timeout.as_millis(),
                }),
            }
        })
    }

    /// The entries of a directory (not recursive), sorted by name.
    pub fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let mut v: Vec<Entry> = self
            .call("list", dir, self.client.list_status(dir, false))?
            .into_iter()
            .map(Entry::from_status)
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// A file's or directory's status; `None` when it does not exist.
    pub fn stat(&self, path: &str) -> Result<Option<Entry>> {
        match self.call("stat", path, self.client.get_file_info(path)) {
            Ok(s) => Ok(Some(Entry::from_status(s))),
            Err(StorageError::Hdfs { message, .. }) if message.starts_with("file not found") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The files matching a glob (`*`, `?`, `[...]`, `{a,b}`), sorted by path.
    pub fn glob(&self, pattern: &str) -> Result<Vec<Entry>> {
        let mut v: Vec<Entry> = self
            .call("glob", pattern, self.client.glob_status(pattern))?
            .into_iter()
            .map(Entry::from_status)
            .filter(|e| !e.is_dir)
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(v)
    }

    /// Streams `[offset, offset + len)` of a file (the whole rest when `len` is `None`) into
    /// `sink`, chunk by chunk; each chunk must arrive within the timeout. `sink` may refuse the
    /// bytes (then the transfer stops with that error). Returns the bytes streamed.
    pub fn read_range(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        sink: &mut dyn FnMut(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<u64> {
        self.stream(path, offset, len, &mut |b| sink(&b))
    }

    /// [`Self::read_range`] handing over the chunks themselves (reference-counted, no copy).
    fn stream(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        sink: &mut dyn FnMut(Bytes) -> std::result::Result<(), String>,
    ) -> Result<u64> {
        let reader = self.call("open", path, self.client.read(path))?;
        let file_len = reader.file_length() as u64;
        let start = offset.min(file_len);
        let len = len.map_or(file_len - start, |l| l.min(file_len - start));
        let timeout = self.timeout;
        self.runtime.block_on(async {
            let mut stream = Box::pin(reader.read_range_stream(start as usize, len as usize));
            let mut done = 0u64;
            loop {
                let next = match tokio::time::timeout(timeout, stream.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        return Err(StorageError::Timeout {
                            op: "read",
                            path: path.to_owned(),
                            ms: timeout.as_millis(),
                        })
                    }
                };
                match next {
                    None => return Ok(done),
                    Some(Err(e)) => return Err(hdfs_err("read", path, e)),
                    Some(Ok(bytes)) => {
                        let n = bytes.len() as u64;
                        sink(bytes).map_err(|message| StorageError::Rejected {
                            path: path.to_owned(),
                            message,
                        })?;
                        done += n;
                    }
                }
            }
        })
    }

    /// Downloads a whole file to a local path, through `check` (which sees every byte in
    /// order and may refuse them); the local file is written with direct I/O where the file
    /// system takes it (see [`DirectWriter`]) and synced, only when every byte arrived and
    /// `check` accepted them, else removed.
    pub fn download(
        &self,
        path: &str,
        dest: &Path,
        check: &mut dyn FnMut(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<u64> {
        let local = |e: std::io::Error| StorageError::Local {
            path: dest.display().to_string(),
            source: e,
        };
        let mut file = DirectWriter::create(dest).map_err(local)?;
        // The disk writes run on a thread of their own, so that the next chunks arrive from
        // the network while one is written (a direct write waits for the device).
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(32);
        let writer = std::thread::Builder::new()
            .name("rankd-hdfs-write".into())
            .spawn(move || -> std::io::Result<()> {
                for chunk in rx {
                    file.write_all(&chunk)?;
                }
                file.finish()
            })
            .map_err(local)?;
        let result = self.stream(path, 0, None, &mut |b| {
            check(&b)?;
            tx.send(b).map_err(|_| "the local write failed".to_owned())
        });
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread panicked")));
        let finished = match (result, written) {
            (_, Err(e)) => Err(local(e)),
            (r, Ok(())) => r,
        };
        if finished.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        finished
    }

    /// A `Read` over a byte range of a file, fetched in pieces of 4 MiB as it is read (the
    /// whole file is never held in memory or on local disk).
    pub fn reader(
        self: &std::sync::Arc<Self>,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<HdfsReader> {
        let reader = self.call("open", path, self.client.read(path))?;
        let file_len = reader.file_length() as u64;
        let start = offset.min(file_len);
        let end = len.map_or(file_len, |l| (start + l).min(file_len));
        Ok(HdfsReader {
            hdfs: self.clone(),
            path: path.to_owned(),
            reader,
            pos: start,
            end,
            buf: Bytes::new(),
        })
    }

    /// Creates `path` from `source` under a hidden name beside it, then renames it into place:
    /// readers never see a partial file. `overwrite` false refuses an existing `path`.
    pub fn upload(&self, source: &mut dyn Read, path: &str, overwrite: bool) -> Result<u64> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let dir = if dir.is_empty() { "/" } else { dir };
        if !overwrite && self.stat(path)?.is_some() {
            return Err(StorageError::Exists(format!("{}{path}", self.fs)));
        }
        let tmp = join(dir, &format!(".{name}.uploading-{}", std::process::id()));
        let n = self.write_new(source, &tmp);
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                let _ = self.delete(&tmp, false);
                return Err(e);
            }
        };
        if let Err(e) = self.rename(&tmp, path, overwrite) {
            let _ = self.delete(&tmp, false);
            return Err(e);
        }
        Ok(n)
    }

    /// Writes a new file (parents created) from `source`; each chunk within the timeout.
    pub fn write_new(&self, source: &mut dyn Read, path: &str) -> Result<u64> {
        let opts = hdfs_native::WriteOptions::default()
            .overwrite(true)
            .create_parent(true);
        let mut writer = self.call("create", path, self.client.create(path, opts))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = source.read(&mut buf).map_err(|e| StorageError::Local {
                path: format!("source of {path}"),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            self.call("write", path, writer.write_bytes(chunk))?;
            total += n as u64;
        }
        self.call("close", path, writer.close())?;
        Ok(total)
    }

    /// Renames `from` to `to` (one atomic NameNode operation).
    pub fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<()> {
        self.call("rename", from, self.client.rename(from, to, overwrite))
    }

    /// Creates a directory and its parents.
    pub fn mkdirs(&self, path: &str) -> Result<()> {
        self.call("mkdirs", path, self.client.mkdirs(path, 0o755, true))
    }

    /// Deletes a path; true when something was deleted.
    pub fn delete(&self, path: &str, recursive: bool) -> Result<bool> {
        self.call("delete", path, self.client.delete(path, recursive))
    }
}

/// A new local file written in whole aligned blocks with `O_DIRECT` where the file system allows
/// it (tmpfs and some others refuse it; then buffered). A daemon downloading a model beside its
/// serving cores must not push the file through the page cache: the kernel would finish the
/// writeback in worker threads that may run on those cores (measured as millisecond stalls of
/// requests in docs/hot-reload.md), and the copy would evict what the cores keep cached.
#[derive(Debug)]
pub struct DirectWriter {
    file: std::fs::File,
    path: PathBuf,
    direct: bool,
    raw: Vec<u8>,
    start: usize,
    filled: usize,
    off: u64,
}

/// Bytes per direct write.
const DIRECT_BLOCK: usize = 1 << 20;
/// Direct I/O wants buffers, offsets and lengths aligned to the device's logical block size;
/// 4 KiB covers every common device.
const DIRECT_ALIGN: usize = 4096;

impl DirectWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> std::io::Result<DirectWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false),
            Err(e) => return Err(e),
        };
        let raw = vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Ok(DirectWriter {
            file,
            path: path.to_path_buf(),
            direct,
            raw,
            start,
            filled: 0,
            off: 0,
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let take = bytes.len().min(DIRECT_BLOCK - self.filled);
            let at = self.start + self.filled;
            self.raw[at..at + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == DIRECT_BLOCK {
                self.flush_block(DIRECT_BLOCK)?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let buf = &self.raw[self.start..self.start + len];
        match self.file.write_all_at(buf, self.off) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // Opened with O_DIRECT but refused at write time: go on buffered.
                self.file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
                self.direct = false;
                self.file.write_all_at(buf, self.off)?;
            }
            r => r?,
        }
        self.off += len as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is left (a direct write pads the last block, and the file is cut back to its
    /// length) and syncs.
    pub fn finish(mut self) -> std::io::Result<()> {
        let len = self.off + self.filled as u64;
        if self.filled > 0 {
            let n = if self.direct {
                let rounded = self.filled.next_multiple_of(DIRECT_ALIGN);
                let at = self.start + self.filled;
                self.raw[at..self.start + rounded].fill(0);
                rounded
            } else {
                self.filled
            };
            self.flush_block(n)?;
        }
        self.file.set_len(len)?;
        self.file.sync_all()
    }
}

/// A `Read` over part of an HDFS file (see [`Hdfs::reader`]).
pub struct HdfsReader {
    hdfs: std::sync::Arc<Hdfs>,
    path: String,
    reader: hdfs_native::file::FileReader,
    pos: u64,
    end: u64,
    buf: Bytes,
}

impl std::fmt::Debug for HdfsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HdfsReader")
            .field("path", &self.path)
            .field("pos", &self.pos)
            .field("end", &self.end)
            .finish()
    }
}

/// Bytes fetched per range read of an [`HdfsReader`].
const READ_CHUNK: u64 = 4 << 20;

impl Read for HdfsReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.end {
                return Ok(0);
            }
            let n = READ_CHUNK.min(self.end - self.pos);
            let (pos, path) = (self.pos as usize, self.path.clone());
            self.buf = self
                .hdfs
                .call("read", &path, self.reader.read_range(pos, n as usize))
                .map_err(std::io::Error::other)?;
            self.pos += self.buf.len() as u64;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// Opens a local path or an `hdfs://` file for streaming reads.
pub fn open_read(path: &Path, settings: &HdfsSettings) -> Result<Box<dyn Read + Send>> {
    match Location::from_path(path)? {
        Location::Local(p) => {
            let f = std::fs::File::open(&p).map_err(|e| StorageError::Local {
                path: p.display().to_string(),
                source: e,
            })?;
            Ok(Box::new(f))
        }
        Location::Hdfs(h) => {
            let hdfs = Hdfs::for_path(&h, settings)?;
            Ok(Box::new(hdfs.reader(&h.path, 0, None)?))
        }
    }
}

/// The length of a local or `hdfs://` file.
pub fn file_len(path: &Path, settings: &HdfsSettings) -> Result<u64> {
    match Location::from_path(path)? {
        Location::Local(p) => {
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| StorageError::Local {
                    path: p.display().to_string(),
                    source: e,
                })
        }
        Location::Hdfs(h) => Hdfs::for_path(&h, settings)?
            .stat(&h.path)?
            .map(|e| e.len)
            .ok_or_else(|| StorageError::Hdfs {
                op: "stat",
                path: h.url(),
                message: "file not found".into(),
            }),
    }
}

/// Opens a local path or an `hdfs://` file for streaming reads from byte `offset` on.
pub fn open_read_at(
    path: &Path,
    offset: u64,
    settings: &HdfsSettings,
) -> Result<Box<dyn Read + Send>> {
    match Location::from_path(path)? {
        Location::Local(p) => {
            use std::io::Seek;
            let local = |e: std::io::Error| StorageError::Local {
                path: p.display().to_string(),
                source: e,
            };
            let mut f = std::fs::File::open(&p).map_err(local)?;
            f.seek(std::io::SeekFrom::Start(offset)).map_err(local)?;
            Ok(Box::new(f))
        }
        Location::Hdfs(h) => {
            let hdfs = Hdfs::for_path(&h, settings)?;
            Ok(Box::new(hdfs.reader(&h.path, offset, None)?))
        }
    }
}

/// Whether a local path or an `hdfs://` path exists.
pub fn exists(path: &Path, settings: &HdfsSettings) -> Result<bool> {
    match Location::from_path(path)? {
        Location::Local(p) => Ok(p.exists()),
        Location::Hdfs(h) => Ok(Hdfs::for_path(&h, settings)?.stat(&h.path)?.is_some()),
    }
}

/// The files an `hdfs://` glob matches, as URLs, sorted; an error when none does.
pub fn glob_urls(pattern: &HdfsPath, settings: &HdfsSettings) -> Result<Vec<String>> {
    let hdfs = Hdfs::for_path(pattern, settings)?;
    let found = hdfs.glob(&pattern.path)?;
    if found.is_empty() {
        return Err(StorageError::Hdfs {
            op: "glob",
            path: pattern.url(),
            message: "matches no file".into(),
        });
    }
    Ok(found
        .into_iter()
        .map(|e| format!("{}{}", pattern.fs, e.path))
        .collect())
}

/// Copies a local file to `dest` (a local path or `hdfs://`), under a hidden name first and
/// renamed into place, replacing what was there.
pub fn put_file(local: &Path, dest: &Path, settings: &HdfsSettings) -> Result<u64> {
    let src_err = |e: std::io::Error| StorageError::Local {
        path: local.display().to_string(),
        source: e,
    };
    match Location::from_path(dest)? {
        Location::Local(p) => std::fs::copy(local, &p).map_err(src_err),
        Location::Hdfs(h) => {
            let mut f = std::fs::File::open(local).map_err(src_err)?;
            Hdfs::for_path(&h, settings)?.upload(&mut f, &h.path, true)
        }
    }
}

/// Copies `src` (a local path or `hdfs://`) to a local file.
pub fn get_file(src: &Path, local: &Path, settings: &HdfsSettings) -> Result<u64> {
    match Location::from_path(src)? {
        Location::Local(p) => std::fs::copy(&p, local).map_err(|e| StorageError::Local {
            path: p.display().to_string(),
            source: e,
        }),
        Location::Hdfs(h) => {
            Hdfs::for_path(&h, settings)?.download(&h.path, local, &mut |_| Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("/srv/models").unwrap(),
            Location::Local("/srv/models".into())
        );
        assert_eq!(
            Location::parse("relative/dir").unwrap(),
            Location::Local("relative/dir".into())
        );
        let Location::Hdfs(h) = Location::parse("hdfs://127.0.0.1:9000/models/").unwrap() else {
            panic!("not hdfs");
        };
        assert_eq!(h.fs, "hdfs://127.0.0.1:9000");
        assert_eq!(h.path, "/models");
        assert_eq!(h.url(), "hdfs://127.0.0.1:9000/models");
        assert_eq!(h.join("feed").path, "/models/feed");
        let Location::Hdfs(ns) = Location::parse("HDFS://prod-ns").unwrap() else {
            panic!("not hdfs");
        };
        assert_eq!((ns.fs.as_str(), ns.path.as_str()), ("hdfs://prod-ns", "/"));
        for bad in [
            "s3://bucket/models",
            "file:///srv/models",
            "viewfs://x/y",
            "gs://b",
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(e.to_string().contains("unsupported scheme"), "{bad}: {e}");
        }
        assert!(Location::parse("hdfs:///models").is_err());
        assert!(Location::is_hdfs(Path::new("hdfs://nn:8020/x")));
        assert!(!Location::is_hdfs(Path::new("/x")));
    }

    #[test]
    fn direct_writes_are_exact_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0usize,
            1,
            4095,
            4096,
            4097,
            (1 << 20) - 1,
            1 << 20,
            (3 << 20) + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            let mut w = DirectWriter::create(&path).unwrap();
            // Uneven pieces, as the network delivers them.
            for piece in data.chunks(65_521) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn an_unreachable_namenode_fails_within_the_timeout() {
        // A listening socket that never answers: the NameNode that accepts and hangs.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let hdfs = Hdfs::connect(
            &format!("hdfs://{addr}"),
            &HdfsSettings {
                timeout: Duration::from_millis(300),
                ..HdfsSettings::default()
            },
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = hdfs.list("/").unwrap_err();
        assert!(matches!(e, StorageError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        drop(silent);
    }
}

pub mod testing {
    //! A real HDFS for tests: the cluster `.ci/run` started (`RANKD_HDFS_URL`, with
    //! `RANKD_HDFS_DIR`), or one started here through `scripts/hdfs.sh` for this test process.
    //! Outside CI, tests skip with a printed reason when Java or Maven is missing; in CI
    //! (`CI=true`) that is a failure.

    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A running single-node HDFS.
    #[derive(Debug)]
    pub struct Cluster {
        /// `hdfs://127.0.0.1:PORT`.
        pub url: String,
        /// The script's directory of this cluster (its FsShell configuration).
        pub dir: PathBuf,
        owned: bool,
    }

    /// The repository's `scripts/hdfs.sh`.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hdfs.sh")
    }

    fn skip_or_fail(reason: &str) -> Option<Cluster> {
        skip_or_fail_in_ci("HDFS", reason)
    }

    /// `None`, with `reason` printed; in CI (`CI=true`), where every `what` test must run, a
    /// panic.
    pub(crate) fn skip_or_fail_in_ci<T>(what: &str, reason: &str) -> Option<T> {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{what} tests must run in CI: {reason}");
        }
        println!("skipped: {reason}");
        None
    }

    /// Whether Java and Maven, which the real HDFS and Kafka for tests need, are installed.
    pub(crate) fn tools_present() -> bool {
        ["java", "mvn"].iter().all(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// The shared cluster of `RANKD_HDFS_URL`, else a private one.
    pub fn cluster() -> Option<Cluster> {
        if let (Ok(url), Ok(dir)) = (
            std::env::var("RANKD_HDFS_URL"),
            std::env::var("RANKD_HDFS_DIR"),
        ) {
            return Some(Cluster {
                url,
                dir: dir.into(),
                owned: false,
            });
        }
        private_cluster(0)
    }

    /// A cluster of this test's own (stopped on drop), on `port` (0: any free port).
    pub fn private_cluster(port: u16) -> Option<Cluster> {
        if !tools_present() {
            return skip_or_fail("java and mvn are needed to run a MiniDFSCluster");
        }
        let dir = std::env::temp_dir().join(format!(
            "rankd-hdfs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        start_in(&dir, port).map(|url| Cluster {
            url,
            dir,
            owned: true,
        })
    }

    fn start_in(dir: &Path, port: u16) -> Option<String> {
        let out = Command::new(script())
            .arg("start")
            .arg(dir)
            .args(["--port", &port.to_string()])
            .args(["--owner", &std::process::id().to_string()])
            .output()
            .expect("run scripts/hdfs.sh");
        if !out.status.success() {
            return skip_or_fail(&format!(
                "scripts/hdfs.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
            .map(|c| c.url.clone());
        }
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    impl Cluster {
        /// Hadoop's FsShell on this cluster (`-put`, `-get`, `-checksum`, ...): (success,
        /// stdout, stderr).
        pub fn fs(&self, args: &[&str]) -> (bool, String, String) {
            let out = Command::new(script())
                .arg("fs")
                .arg(&self.dir)
                .arg("--")
                .args(args)
                .output()
                .expect("run scripts/hdfs.sh fs");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }

        /// The process id of the cluster's JVM.
        pub fn pid(&self) -> Option<i32> {
            std::fs::read_to_string(self.dir.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        }

        /// The NameNode's port.
        pub fn port(&self) -> u16 {
            self.url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        }

        /// Stops this (private) cluster and starts a fresh one on the same port: the same URL,
        /// empty.
        pub fn restart(&mut self) -> bool {
            assert!(self.owned, "only a private cluster is restarted");
            self.stop();
            match start_in(&self.dir, self.port()) {
                Some(url) => {
                    self.url = url;
                    true
                }
                None => false,
            }
        }

        /// Stops the cluster (a private one only).
        pub fn stop(&self) {
            if self.owned {
                let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
            }
        }

        /// A fresh directory for one test: `hdfs://.../NAME-<unique>`.
        pub fn unique_dir(&self, name: &str) -> String {
            format!(
                "{}/{name}-{}-{}",
                self.url,
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            )
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            if self.owned {
                self.stop();
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}
