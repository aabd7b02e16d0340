//! The messages between workers and parameter-server shards: a u32 length (of what follows), a
//! type byte, then the payload; integers and floats little-endian.

use std::io::{Read, Write};

use crate::error::{Result, TrainError};

/// Chief to shard: the job (worker count, seed, base rate, checkpoint to restore, fitted model).
pub const INIT: u8 = 1;
/// Worker to shard: joins; answered with [`READY`] once the chief has initialized the shard.
pub const HELLO: u8 = 2;
/// Shard to worker: the epoch to start at and the fitted model config (JSON).
pub const READY: u8 = 3;
/// Worker to shard: the rows of a batch (and the dense tensors the shard owns).
pub const PULL: u8 = 4;
/// Shard to worker: the pulled values.
pub const ROWS: u8 = 5;
/// Worker to shard: the gradients of a batch for the rows and tensors the shard owns.
pub const PUSH: u8 = 6;
/// Worker to shard 0: waits for every worker; the chief's payload goes to all.
pub const BARRIER: u8 = 7;
/// Shard 0 to every worker: the barrier passed.
pub const PASSED: u8 = 8;
/// Chief to shard: write the shard's state to a path.
pub const SAVE: u8 = 9;
/// Chief to shard: replace the shard's state with the one saved at a path.
pub const LOAD: u8 = 10;
/// Shard to worker: a request done.
pub const OK: u8 = 11;
/// Shard to worker: a request failed; the payload is the reason (UTF-8).
pub const ERR: u8 = 12;
/// Worker to shard: this worker is finished; a shard exits when every worker is.
pub const DONE: u8 = 13;

/// The largest message accepted (a batch's rows and gradients are far smaller).
pub const MAX_MESSAGE: usize = 1 << 31;

/// A message being written.
#[derive(Debug, Default)]
pub struct Buf(pub Vec<u8>);

impl Buf {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.0.reserve(4 * v.len());
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn u32s(&mut self, v: &[u32]) {
        self.u32(v.len() as u32);
        self.0.reserve(4 * v.len());
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
}

/// A message being read; every read checks the length.
#[derive(Debug)]
pub struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(TrainError::Data("truncated message".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_bits(self.u32()?))
    }
    /// `out.len()` floats.
    pub fn f32s_into(&mut self, out: &mut [f32]) -> Result<()> {
        let bytes = self.take(4 * out.len())?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
    /// `n` floats appended to `out`.
    pub fn f32s_push(&mut self, n: usize, out: &mut Vec<f32>) -> Result<()> {
        let at = out.len();
        out.resize(at + n, 0.0);
        self.f32s_into(&mut out[at..])
    }
    /// A length-prefixed u32 list into `out` (cleared first).
    pub fn u32s(&mut self, out: &mut Vec<u32>) -> Result<()> {
        let n = self.u32()? as usize;
        let bytes = self.take(4 * n)?;
        out.clear();
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(())
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<&'a str> {
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| TrainError::Data("a string that is not UTF-8".into()))
    }
}

/// Writes one message and flushes.
pub fn send(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&((payload.len() + 1) as u32).to_le_bytes())?;
    w.write_all(&[kind])?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one message into `body` (reused); returns its type.
pub fn recv(r: &mut impl Read, body: &mut Vec<u8>) -> std::io::Result<u8> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("bad message length {len}")));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    body.clear();
    body.resize(len - 1, 0);
    r.read_exact(body)?;
    Ok(kind[0])
}
