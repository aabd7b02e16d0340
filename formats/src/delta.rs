//! Parameter deltas: the changes online training makes to a served model version, as they travel
//! from `rankd-train online` to every daemon replica (through a Kafka topic, but nothing here
//! knows about Kafka).
//!
//! A [`Delta`] names the model and the version it applies to (its *base*), a sequence number
//! (1, 2, ... per base), the embedding and wide rows that changed since the previous delta (their
//! new values, whole rows), and the dense tensors whole when they changed. [`Delta::encode`]
//! writes it as one byte string ending in a checksum; [`split`] cuts that into messages of a
//! bounded size and [`Assembler`] puts them back together on the other side. The byte layout is
//! in `docs/online.md`, exact enough for another language.

use xxhash_rust::xxh3::xxh3_64;

/// The first eight bytes of an encoded delta.
pub const DELTA_MAGIC: [u8; 8] = *b"RKDELTA1";
/// The first four bytes of a delta part (one message).
pub const PART_MAGIC: [u8; 4] = *b"RKDP";
/// Bytes of a part's header before its payload.
pub const PART_HEADER_LEN: usize = 48;
/// The part format version this build writes and reads.
pub const PART_FORMAT: u16 = 1;

/// What is wrong with a delta or one of its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The bytes do not match their checksum.
    #[error("delta checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum {
        /// Stored value.
        stored: u64,
        /// Computed value.
        computed: u64,
    },
    /// The bytes are not a delta (or a part) of a format this build reads.
    #[error("malformed delta: {0}")]
    Malformed(String),
    /// The parts of a delta did not arrive as a complete run (a part is missing or repeated).
    #[error("incomplete delta: {0}")]
    Incomplete(String),
    /// A delta larger than the receiver's limit.
    #[error("delta of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The delta does not fit the model it is applied to.
    #[error("delta does not fit the model: {0}")]
    Mismatch(String),
}

/// Which table a [`RowUpdate`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// An embedding table (index into the model's embeddings, in deep-input order).
    Embedding,
    /// A wide weight vector (index into the wide slots; one value a row).
    Wide,
}

/// New values of some rows of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowUpdate {
    /// The kind of table.
    pub kind: TableKind,
    /// Its index among the tables of that kind.
    pub index: u32,
    /// Values per row (the embedding's dimension; 1 for a wide table).
    pub dim: u32,
    /// Row ids, each at most once.
    pub rows: Vec<u32>,
    /// `rows.len() * dim` values, row after row, in the order of `rows`: the rows' values as
    /// served (an f16 or int8 table's rows already rounded as the model file would store them).
    pub values: Vec<f32>,
}

/// A dense layer's new weights and bias, whole.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerUpdate {
    /// The layer's index (0 = first deep layer).
    pub index: u32,
    /// Outputs.
    pub out_dim: u32,
    /// Inputs.
    pub in_dim: u32,
    /// `[out][in]`, row-major.
    pub weight: Vec<f32>,
    /// `out` values.
    pub bias: Vec<f32>,
}

/// One delta.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    /// The model's name (its metadata name).
    pub model: String,
    /// The version it applies to.
    pub base_version: u64,
    /// 1 for the first delta on a base, then one more for each.
    pub sequence: u64,
    /// When the trainer built it (Unix milliseconds).
    pub created_ms: u64,
    /// The arrival time (Kafka timestamp, Unix milliseconds) of the newest training sample it
    /// reflects; 0 when unknown.
    pub newest_sample_ms: u64,
    /// Changed rows.
    pub tables: Vec<RowUpdate>,
    /// The wide bias, when it changed.
    pub wide_bias: Option<f32>,
    /// Dense layers that changed, whole.
    pub layers: Vec<LayerUpdate>,
}

impl Delta {
    /// Rows changed, over every table.
    pub fn changed_rows(&self) -> usize {
        self.tables.iter().map(|t| t.rows.len()).sum()
    }

    /// The encoded form: little-endian fields, then the xxh3-64 of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            64 + self.model.len()
                + self
                    .tables
                    .iter()
                    .map(|t| 16 + 4 * (t.rows.len() + t.values.len()))
                    .sum::<usize>()
                + self
                    .layers
                    .iter()
                    .map(|l| 12 + 4 * (l.weight.len() + l.bias.len()))
                    .sum::<usize>(),
        );
        b.extend_from_slice(&DELTA_MAGIC);
        for v in [
            self.base_version,
            self.sequence,
            self.created_ms,
            self.newest_sample_ms,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        put_u32(&mut b, self.model.len() as u32);
        b.extend_from_slice(self.model.as_bytes());
        put_u32(&mut b, self.tables.len() as u32);
        for t in &self.tables {
            put_u32(
                &mut b,
                match t.kind {
                    TableKind::Embedding => 0,
                    TableKind::Wide => 1,
                },
            );
            put_u32(&mut b, t.index);
            put_u32(&mut b, t.dim);
            put_u32(&mut b, t.rows.len() as u32);
            t.rows.iter().for_each(|&r| put_u32(&mut b, r));
            t.values.iter().for_each(|&v| put_f32(&mut b, v));
        }
        match self.wide_bias {
            Some(v) => {
                put_u32(&mut b, 1);
                put_f32(&mut b, v);
            }
            None => {
                put_u32(&mut b, 0);
                put_f32(&mut b, 0.0);
            }
        }
        put_u32(&mut b, self.layers.len() as u32);
        for l in &self.layers {
            put_u32(&mut b, l.index);
            put_u32(&mut b, l.out_dim);
            put_u32(&mut b, l.in_dim);
            l.weight.iter().for_each(|&v| put_f32(&mut b, v));
            l.bias.iter().for_each(|&v| put_f32(&mut b, v));
        }
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes (and checks) an encoded delta. Every length is checked against the bytes left
    /// before anything is allocated for it.
    pub fn decode(bytes: &[u8]) -> Result<Delta, DeltaError> {
        if bytes.len() < 8 + 8 {
            return Err(DeltaError::Malformed(format!(
                "{} bytes, shorter than a delta",
                bytes.len()
            )));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 8);
        let stored = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
        let computed = xxh3_64(body);
        if stored != computed {
            return Err(DeltaError::Checksum { stored, computed });
        }
        let mut r = Reader { b: body, at: 0 };
        if r.take(8)? != DELTA_MAGIC {
            return Err(DeltaError::Malformed(
                "does not start with \"RKDELTA1\"".into(),
            ));
        }
        let base_version = r.u64()?;
        let sequence = r.u64()?;
        let created_ms = r.u64()?;
        let newest_sample_ms = r.u64()?;
        let name_len = r.u32()? as usize;
        let model = std::str::from_utf8(r.take(name_len)?)
            .map_err(|_| DeltaError::Malformed("model name is not UTF-8".into()))?
            .to_owned();
        let ntables = r.u32()?;
        let mut tables = Vec::new();
        for t in 0..ntables {
            let kind = match r.u32()? {
                0 => TableKind::Embedding,
                1 => TableKind::Wide,
                k => {
                    return Err(DeltaError::Malformed(format!(
                        "table {t}: unknown kind {k}"
                    )))
                }
            };
            let index = r.u32()?;
            let dim = r.u32()?;
            let n = r.u32()? as usize;
            if dim == 0 || (kind == TableKind::Wide && dim != 1) {
                return Err(DeltaError::Malformed(format!(
                    "table {t}: dimension {dim} for a {kind:?} table"
                )));
            }
            let rows = r.u32s(n)?;
            let values = r.f32s(n.checked_mul(dim as usize).ok_or_else(|| {
                DeltaError::Malformed(format!("table {t}: {n} rows of {dim} overflow"))
            })?)?;
            tables.push(RowUpdate {
                kind,
                index,
                dim,
                rows,
                values,
            });
        }
        let has_bias = r.u32()?;
        let bias = r.f32()?;
        let wide_bias = match has_bias {
            0 => None,
            1 => Some(bias),
            k => return Err(DeltaError::Malformed(format!("wide bias flag {k}"))),
        };
        let nlayers = r.u32()?;
        let mut layers = Vec::new();
        for _ in 0..nlayers {
            let index = r.u32()?;
            let out_dim = r.u32()?;
            let in_dim = r.u32()?;
            let n = (out_dim as usize)
                .checked_mul(in_dim as usize)
                .ok_or_else(|| DeltaError::Malformed(format!("layer {index}: shape overflows")))?;
            let weight = r.f32s(n)?;
            let bias = r.f32s(out_dim as usize)?;
            layers.push(LayerUpdate {
                index,
                out_dim,
                in_dim,
                weight,
                bias,
            });
        }
        if r.at != body.len() {
            return Err(DeltaError::Malformed(format!(
                "{} bytes after the last layer",
                body.len() - r.at
            )));
        }
        Ok(Delta {
            model,
            base_version,
            sequence,
            created_ms,
            newest_sample_ms,
            tables,
            wide_bias,
            layers,
        })
    }
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_f32(b: &mut Vec<u8>, v: f32) {
    b.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DeltaError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                DeltaError::Malformed(format!(
                    "needs {n} bytes at offset {}, {} left",
                    self.at,
                    self.b.len() - self.at
                ))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, DeltaError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, DeltaError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn f32(&mut self) -> Result<f32, DeltaError> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u32s(&mut self, n: usize) -> Result<Vec<u32>, DeltaError> {
        let bytes = self.take(
            n.checked_mul(4)
                .ok_or_else(|| DeltaError::Malformed(format!("{n} values overflow")))?,
        )?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect())
    }

    fn f32s(&mut self, n: usize) -> Result<Vec<f32>, DeltaError> {
        let bytes = self.take(
            n.checked_mul(4)
                .ok_or_else(|| DeltaError::Malformed(format!("{n} values overflow")))?,
        )?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect())
    }
}

/// The header of one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHeader {
    /// The delta's base version.
    pub base_version: u64,
    /// The delta's sequence number.
    pub sequence: u64,
    /// This part's index, from 0.
    pub part: u32,
    /// How many parts the delta has.
    pub parts: u32,
    /// The encoded delta's length.
    pub total_len: u64,
    /// The encoded delta's checksum (its last eight bytes), tying the parts together.
    pub checksum: u64,
}

impl PartHeader {
    /// Reads a part's header; returns it and the payload.
    pub fn parse(msg: &[u8]) -> Result<(PartHeader, &[u8]), DeltaError> {
        if msg.len() < PART_HEADER_LEN {
            return Err(DeltaError::Malformed(format!(
                "a part of {} bytes is shorter than its {PART_HEADER_LEN}-byte header",
                msg.len()
            )));
        }
        if msg[..4] != PART_MAGIC {
            return Err(DeltaError::Malformed(
                "a part does not start with \"RKDP\"".into(),
            ));
        }
        let format = u16::from_le_bytes([msg[4], msg[5]]);
        if format != PART_FORMAT {
            return Err(DeltaError::Malformed(format!(
                "part format {format}; this build reads {PART_FORMAT}"
            )));
        }
        let u64_at = |o: usize| u64::from_le_bytes(msg[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(msg[o..o + 4].try_into().expect("4"));
        let h = PartHeader {
            base_version: u64_at(8),
            sequence: u64_at(16),
            part: u32_at(24),
            parts: u32_at(28),
            total_len: u64_at(32),
            checksum: u64_at(40),
        };
        if h.parts == 0 || h.part >= h.parts {
            return Err(DeltaError::Malformed(format!(
                "part {} of {}",
                h.part, h.parts
            )));
        }
        Ok((h, &msg[PART_HEADER_LEN..]))
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&PART_MAGIC);
        out.extend_from_slice(&PART_FORMAT.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.base_version.to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&self.part.to_le_bytes());
        out.extend_from_slice(&self.parts.to_le_bytes());
        out.extend_from_slice(&self.total_len.to_le_bytes());
        out.extend_from_slice(&self.checksum.to_le_bytes());
    }
}

/// Cuts an encoded delta (of `base_version`, `sequence`) into parts of at most `max_payload`
/// bytes of it each, every part with its header: one message each.
pub fn split(encoded: &[u8], base_version: u64, sequence: u64, max_payload: usize) -> Vec<Vec<u8>> {
    let max_payload = max_payload.max(1);
    let checksum = encoded.len().checked_sub(8).map_or(0, |at| {
        u64::from_le_bytes(encoded[at..].try_into().expect("8"))
    });
    let parts = encoded.len().div_ceil(max_payload).max(1);
    (0..parts)
        .map(|i| {
            let chunk = &encoded
                [(i * max_payload).min(encoded.len())..((i + 1) * max_payload).min(encoded.len())];
            let mut msg = Vec::with_capacity(PART_HEADER_LEN + chunk.len());
            PartHeader {
                base_version,
                sequence,
                part: i as u32,
                parts: parts as u32,
                total_len: encoded.len() as u64,
                checksum,
            }
            .write(&mut msg);
            msg.extend_from_slice(chunk);
            msg
        })
        .collect()
}

/// Puts a delta back together from its parts, read in order from one partition. Memory is
/// bounded by `limit` bytes: a delta announcing more is refused at its first part.
#[derive(Debug)]
pub struct Assembler {
    limit: u64,
    current: Option<(PartHeader, Vec<u8>)>,
}

impl Assembler {
    /// An assembler refusing deltas longer than `limit` bytes.
    pub fn new(limit: u64) -> Assembler {
        Assembler {
            limit,
            current: None,
        }
    }

    /// Takes the next message and returns what it completed or broke, in order: the encoded
    /// delta when this part completes one (the caller decodes it, which checks the checksum),
    /// and an error for a delta this part shows to be incomplete (a part missing, or a part
    /// that does not continue the delta being assembled; that delta is dropped: a delta is
    /// applied whole or not at all). Nothing while parts are still to come.
    pub fn push(&mut self, msg: &[u8]) -> Vec<Result<(PartHeader, Vec<u8>), DeltaError>> {
        let mut out = Vec::new();
        let (h, payload) = match PartHeader::parse(msg) {
            Ok(p) => p,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        };
        if h.total_len > self.limit {
            self.current = None;
            out.push(Err(DeltaError::TooLarge {
                len: h.total_len,
                limit: self.limit,
            }));
            return out;
        }
        if h.part == 0 {
            if let Some((old, _)) = self.current.take() {
                out.push(Err(DeltaError::Incomplete(format!(
                    "base {} sequence {} ended after part {} of {}",
                    old.base_version,
                    old.sequence,
                    old.part + 1,
                    old.parts
                ))));
            }
            let mut buf =
                Vec::with_capacity((h.total_len as usize).min(payload.len() * h.parts as usize));
            buf.extend_from_slice(payload);
            self.current = Some((h, buf));
        } else {
            match &mut self.current {
                Some((cur, buf))
                    if cur.base_version == h.base_version
                        && cur.sequence == h.sequence
                        && cur.checksum == h.checksum
                        && cur.parts == h.parts
                        && cur.total_len == h.total_len
                        && cur.part + 1 == h.part =>
                {
                    buf.extend_from_slice(payload);
                    cur.part = h.part;
                }
                _ => {
                    self.current = None;
                    out.push(Err(DeltaError::Incomplete(format!(
                        "part {} of {} of base {} sequence {} without the parts before it",
                        h.part, h.parts, h.base_version, h.sequence
                    ))));
                    return out;
                }
            }
        }
        let (len, total, last) = match &self.current {
            Some((h, buf)) => (buf.len() as u64, h.total_len, h.part + 1 == h.parts),
            None => return out,
        };
        if len > total || (last && len != total) {
            let (h, _) = self.current.take().expect("checked");
            out.push(Err(DeltaError::Incomplete(format!(
                "base {} sequence {}: parts hold {len} bytes, the delta has {total}",
                h.base_version, h.sequence
            ))));
        } else if last {
            out.push(Ok(self.current.take().expect("checked")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Delta {
        Delta {
            model: "feed".into(),
            base_version: 7,
            sequence: 3,
            created_ms: 1_700_000_000_000,
            newest_sample_ms: 1_699_999_999_000,
            tables: vec![
                RowUpdate {
                    kind: TableKind::Embedding,
                    index: 1,
                    dim: 2,
                    rows: vec![5, 9],
                    values: vec![0.5, -1.0, 2.0, 3.5],
                },
                RowUpdate {
                    kind: TableKind::Wide,
                    index: 0,
                    dim: 1,
                    rows: vec![4],
                    values: vec![0.25],
                },
            ],
            wide_bias: Some(-1.5),
            layers: vec![LayerUpdate {
                index: 1,
                out_dim: 1,
                in_dim: 2,
                weight: vec![0.1, 0.2],
                bias: vec![0.3],
            }],
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let d = sample();
        assert_eq!(Delta::decode(&d.encode()).unwrap(), d);
        let empty = Delta::default();
        assert_eq!(Delta::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Delta::decode(&b).is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(
                Delta::decode(&bytes[..n]).is_err(),
                "truncation to {n} accepted"
            );
        }
    }

    #[test]
    fn lengths_beyond_the_bytes_are_refused_before_allocating() {
        // A valid checksum over a body that announces 2^32-1 rows.
        let mut b = DELTA_MAGIC.to_vec();
        b.extend_from_slice(&[0; 32]);
        b.extend_from_slice(&0u32.to_le_bytes()); // name
        b.extend_from_slice(&1u32.to_le_bytes()); // one table
        for v in [0u32, 0, 16, u32::MAX] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        let err = Delta::decode(&b).unwrap_err();
        assert!(matches!(err, DeltaError::Malformed(_)), "{err}");
    }

    #[test]
    fn parts_reassemble_and_gaps_are_refused() {
        let bytes = sample().encode();
        let parts = split(&bytes, 7, 3, 10);
        assert_eq!(parts.len(), bytes.len().div_ceil(10));
        let mut a = Assembler::new(1 << 20);
        for p in &parts[..parts.len() - 1] {
            assert!(a.push(p).is_empty());
        }
        let done = a.push(parts.last().unwrap());
        let (h, got) = done.into_iter().next().unwrap().unwrap();
        assert_eq!((h.base_version, h.sequence), (7, 3));
        assert_eq!(got, bytes);

        // A part missing in the middle: refused, and the next delta still assembles.
        let mut a = Assembler::new(1 << 20);
        assert!(a.push(&parts[0]).is_empty());
        let r = a.push(&parts[2]);
        assert!(matches!(r[..], [Err(DeltaError::Incomplete(_))]), "{r:?}");
        let next = split(&bytes, 7, 4, 1 << 20);
        assert_eq!(next.len(), 1);
        assert!(matches!(a.push(&next[0])[..], [Ok(_)]));

        // A new delta starting while one is incomplete: the old one is reported, the new kept
        // (here complete in one part).
        let mut a = Assembler::new(1 << 20);
        assert!(a.push(&parts[0]).is_empty());
        let r = a.push(&next[0]);
        assert!(
            matches!(r[..], [Err(DeltaError::Incomplete(_)), Ok(_)]),
            "{r:?}"
        );

        // Over the limit: refused at the first part.
        let mut a = Assembler::new(16);
        assert!(matches!(
            a.push(&parts[0])[..],
            [Err(DeltaError::TooLarge { .. })]
        ));
        // Garbage.
        assert!(matches!(
            a.push(b"not a part at all, just some bytes here.........")[..],
            [Err(DeltaError::Malformed(_))]
        ));
    }
}
