//! The wire protocol (docs/protocol.md): length-prefixed frames with a fixed 20-byte header and a
//! FlatBuffers body (`schema/rpc.fbs`).
//!
//! ```text
//! offset size field
//! 0      2    magic "RK"
//! 2      1    protocol version (1)
//! 3      1    message type
//! 4      2    flags (u16 LE, none defined: 0)
//! 6      2    reserved (0)
//! 8      8    request id (u64 LE), echoed in the response
//! 16     4    body length (u32 LE)
//! ```

/// Header length.
pub const HEADER_LEN: usize = 20;
/// Magic bytes.
pub const MAGIC: [u8; 2] = *b"RK";
/// Protocol version.
pub const VERSION: u8 = 1;

/// Message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// `ScoreRequest` body.
    ScoreRequest = 1,
    /// `ScoreResponse` body.
    ScoreResponse = 2,
    /// Empty body.
    Ping = 3,
    /// Empty body.
    Pong = 4,
    /// `StatusRequest` body.
    StatusRequest = 5,
    /// `StatusResponse` body.
    StatusResponse = 6,
    /// `ErrorResponse` body: the request with this id failed.
    Error = 7,
}

impl MessageType {
    /// Decodes a message type byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => MessageType::ScoreRequest,
            2 => MessageType::ScoreResponse,
            3 => MessageType::Ping,
            4 => MessageType::Pong,
            5 => MessageType::StatusRequest,
            6 => MessageType::StatusResponse,
            7 => MessageType::Error,
            _ => return None,
        })
    }
}

/// Error codes of `ErrorResponse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The body is not a valid FlatBuffer of the expected table.
    MalformedRequest = 1,
    /// No such model.
    UnknownModel = 2,
    /// No such version or label.
    UnknownVersion = 3,
    /// A feature value is wrong (type, size).
    BadFeature = 4,
    /// More items, features or bytes than the server's limits.
    LimitExceeded = 5,
    /// The deadline passed before the request was scored.
    DeadlineExceeded = 6,
    /// The message type is not a request this server answers.
    UnsupportedMessage = 7,
    /// The server is shutting down.
    ShuttingDown = 8,
    /// Anything else.
    Internal = 9,
}

impl ErrorCode {
    /// The code's name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::UnknownVersion => "unknown_version",
            ErrorCode::BadFeature => "bad_feature",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::UnsupportedMessage => "unsupported_message",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    /// Decodes a code.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::MalformedRequest,
            2 => ErrorCode::UnknownModel,
            3 => ErrorCode::UnknownVersion,
            4 => ErrorCode::BadFeature,
            5 => ErrorCode::LimitExceeded,
            6 => ErrorCode::DeadlineExceeded,
            7 => ErrorCode::UnsupportedMessage,
            8 => ErrorCode::ShuttingDown,
            9 => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::MalformedRequest,
        ErrorCode::UnknownModel,
        ErrorCode::UnknownVersion,
        ErrorCode::BadFeature,
        ErrorCode::LimitExceeded,
        ErrorCode::DeadlineExceeded,
        ErrorCode::UnsupportedMessage,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type byte (validated separately, so unknown types can be answered).
    pub msg_type: u8,
    /// Flags.
    pub flags: u16,
    /// Request id.
    pub request_id: u64,
    /// Body length.
    pub body_len: u32,
}

/// Why a header cannot be read; the connection is closed after it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not the rankd magic.
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// Another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The reserved header bytes are not zero.
    #[error("reserved header bytes are {0:#06x}, not zero")]
    Reserved(u16),
    /// A body over the configured limit.
    #[error("frame body of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        limit: u32,
    },
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.msg_type;
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    /// Decodes and checks a header against the body size limit.
    pub fn decode(b: &[u8; HEADER_LEN], max_body: u32) -> Result<FrameHeader, FrameError> {
        if b[0..2] != MAGIC {
            return Err(FrameError::BadMagic([b[0], b[1]]));
        }
        if b[2] != VERSION {
            return Err(FrameError::Version(b[2]));
        }
        let reserved = u16::from_le_bytes([b[6], b[7]]);
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        let h = FrameHeader {
            msg_type: b[3],
            flags: u16::from_le_bytes([b[4], b[5]]),
            request_id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            body_len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
        };
        if h.body_len > max_body {
            return Err(FrameError::TooLarge {
                len: h.body_len,
                limit: max_body,
            });
        }
        Ok(h)
    }
}

/// Appends a whole frame (header and body) to `out`.
pub fn write_frame(out: &mut Vec<u8>, msg_type: MessageType, request_id: u64, body: &[u8]) {
    let h = FrameHeader {
        msg_type: msg_type as u8,
        flags: 0,
        request_id,
        body_len: body.len() as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let h = FrameHeader {
            msg_type: 1,
            flags: 0,
            request_id: 0xdead_beef_0102,
            body_len: 77,
        };
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b, 100).unwrap(), h);
        assert_eq!(
            FrameHeader::decode(&b, 10),
            Err(FrameError::TooLarge { len: 77, limit: 10 })
        );
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&bad, 100),
            Err(FrameError::BadMagic(_))
        ));
        let mut bad = b;
        bad[2] = 9;
        assert_eq!(FrameHeader::decode(&bad, 100), Err(FrameError::Version(9)));
    }
}
