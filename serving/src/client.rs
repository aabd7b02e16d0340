//! The Rust client: request building (row-oriented in, columnar on the wire), a connection with
//! pipelining (send many, receive in any order, matched by request id), and a small pool.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use flatbuffers::FlatBufferBuilder;

use crate::gen::rankd::rpc as fb;
use crate::protocol::{write_frame, ErrorCode, FrameHeader, MessageType, HEADER_LEN};

/// A feature value to send.
#[derive(Clone, Debug, PartialEq)]
pub enum FeatureValue {
    /// A number.
    F64(f64),
    /// An integer.
    I64(i64),
    /// A string.
    Str(String),
    /// A list of integers.
    I64List(Vec<i64>),
    /// A list of strings.
    StrList(Vec<String>),
}

impl FeatureValue {
    fn kind(&self) -> fb::Kind {
        match self {
            FeatureValue::F64(_) => fb::Kind::F64,
            FeatureValue::I64(_) => fb::Kind::I64,
            FeatureValue::Str(_) => fb::Kind::Str,
            FeatureValue::I64List(_) => fb::Kind::I64List,
            FeatureValue::StrList(_) => fb::Kind::StrList,
        }
    }
}

/// A score request.
#[derive(Clone, Debug, Default)]
pub struct ScoreRequest {
    /// Model name.
    pub model: String,
    /// Exact version (0: not given).
    pub version: u64,
    /// Label (empty: not given).
    pub label: String,
    /// Routing key for the traffic split.
    pub routing_key: String,
    /// Relative deadline in microseconds (0: none).
    pub deadline_us: u64,
    /// Request-level features.
    pub user: Vec<(String, FeatureValue)>,
    /// Items, each with its features.
    pub items: Vec<Vec<(String, FeatureValue)>>,
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server's answer could not be read.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The request could not be encoded.
    #[error("request: {0}")]
    Request(String),
    /// The server answered with an error.
    #[error("server error {code:?}: {message}")]
    Server {
        /// The code (None if unknown to this client).
        code: Option<ErrorCode>,
        /// The raw code.
        raw_code: u16,
        /// The message.
        message: String,
    },
}

/// A successful score response.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreResult {
    /// The model that answered.
    pub model: String,
    /// The version that served.
    pub version: u64,
    /// One score per item.
    pub scores: Vec<f32>,
}

impl ScoreRequest {
    /// Encodes the FlatBuffers body (item features sent as columns).
    pub fn encode(&self) -> Result<Vec<u8>, ClientError> {
        let mut fbb = FlatBufferBuilder::with_capacity(1024 + self.items.len() * 64);
        let mut user = Vec::with_capacity(self.user.len());
        for (name, v) in &self.user {
            let n = fbb.create_string(name);
            let mut args = fb::FeatureArgs {
                name: Some(n),
                kind: v.kind(),
                ..Default::default()
            };
            match v {
                FeatureValue::F64(x) => args.f64_ = *x,
                FeatureValue::I64(x) => args.i64_ = *x,
                FeatureValue::Str(s) => args.str = Some(fbb.create_string(s)),
                FeatureValue::I64List(l) => args.i64s = Some(fbb.create_vector(l)),
                FeatureValue::StrList(l) => {
                    let offs: Vec<_> = l.iter().map(|s| fbb.create_string(s)).collect();
                    args.strs = Some(fbb.create_vector(&offs));
                }
            }
            user.push(fb::Feature::create(&mut fbb, &args));
        }
        // Columns in order of first appearance.
        let mut order: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for item in &self.items {
            for (name, _) in item {
                if !index.contains_key(name.as_str()) {
                    index.insert(name, order.len());
                    order.push(name);
                }
            }
        }
        let n = self.items.len();
        let mut columns = Vec::with_capacity(order.len());
        for name in &order {
            let mut values: Vec<Option<&FeatureValue>> = Vec::with_capacity(n);
            for item in &self.items {
                values.push(item.iter().find(|(k, _)| k == name).map(|(_, v)| v));
            }
            let kind = values
                .iter()
                .flatten()
                .next()
                .map_or(fb::Kind::Missing, |v| v.kind());
            if values.iter().flatten().any(|v| v.kind() != kind) {
                return Err(ClientError::Request(format!(
                    "item feature `{name}` has values of different kinds"
                )));
            }
            let mut missing = vec![0u8; n.div_ceil(8)];
            for (i, v) in values.iter().enumerate() {
                if v.is_none() {
                    missing[i / 8] |= 1 << (i % 8);
                }
            }
            let has_missing = missing.iter().any(|&b| b != 0);
            let nm = fbb.create_string(name);
            let mut args = fb::ItemColumnArgs {
                name: Some(nm),
                kind,
                ..Default::default()
            };
            match kind {
                fb::Kind::F64 => {
                    let v: Vec<f64> = values
                        .iter()
                        .map(|v| match v {
                            Some(FeatureValue::F64(x)) => *x,
                            _ => 0.0,
                        })
                        .collect();
                    args.f64s = Some(fbb.create_vector(&v));
                }
                fb::Kind::I64 => {
                    let v: Vec<i64> = values
                        .iter()
                        .map(|v| match v {
                            Some(FeatureValue::I64(x)) => *x,
                            _ => 0,
                        })
                        .collect();
                    args.i64s = Some(fbb.create_vector(&v));
                }
                fb::Kind::Str => {
                    let offs: Vec<_> = values
                        .iter()
                        .map(|v| match v {
                            Some(FeatureValue::Str(s)) => fbb.create_string(s),
                            _ => fbb.create_string(""),
                        })
                        .collect();
                    args.strs = Some(fbb.create_vector(&offs));
                }
                fb::Kind::I64List => {
                    let mut flat = Vec::new();
                    let mut offsets = vec![0u32];
                    for v in &values {
                        if let Some(FeatureValue::I64List(l)) = v {
                            flat.extend_from_slice(l);
                        }
                        offsets.push(flat.len() as u32);
                    }
                    args.i64s = Some(fbb.create_vector(&flat));
                    args.offsets = Some(fbb.create_vector(&offsets));
                }
                fb::Kind::StrList => {
                    let mut flat = Vec::new();
                    let mut offsets = vec![0u32];
                    for v in &values {
                        if let Some(FeatureValue::StrList(l)) = v {
                            for s in l {
                                flat.push(fbb.create_string(s));
                            }
                        }
                        offsets.push(flat.len() as u32);
                    }
                    args.strs = Some(fbb.create_vector(&flat));
                    args.offsets = Some(fbb.create_vector(&offsets));
                }
                _ => {}
            }
            if has_missing {
                args.missing = Some(fbb.create_vector(&missing));
            }
            columns.push(fb::ItemColumn::create(&mut fbb, &args));
        }
        let user = fbb.create_vector(&user);
        let columns = fbb.create_vector(&columns);
        let model = fbb.create_string(&self.model);
        let label = fbb.create_string(&self.label);
        let key = fbb.create_string(&self.routing_key);
        let r = fb::ScoreRequest::create(
            &mut fbb,
            &fb::ScoreRequestArgs {
                model: Some(model),
                version: self.version,
                label: Some(label),
                routing_key: Some(key),
                deadline_us: self.deadline_us,
                num_items: n as u32,
                user: Some(user),
                items: Some(columns),
            },
        );
        fbb.finish(r, None);
        Ok(fbb.finished_data().to_vec())
    }
}

/// A decoded response frame.
#[derive(Debug)]
pub struct Response {
    /// Message type.
    pub msg_type: u8,
    /// Request id.
    pub request_id: u64,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// Interprets a response to a score request.
    pub fn into_score(self) -> Result<ScoreResult, ClientError> {
        match MessageType::from_u8(self.msg_type) {
            Some(MessageType::ScoreResponse) => {
                let r = flatbuffers::root::<fb::ScoreResponse<'_>>(&self.body)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(ScoreResult {
                    model: r.model().unwrap_or("").to_owned(),
                    version: r.version(),
                    scores: r.scores().map(|s| s.iter().collect()).unwrap_or_default(),
                })
            }
            Some(MessageType::Error) => Err(self.into_error()),
            _ => Err(ClientError::Protocol(format!(
                "unexpected message type {}",
                self.msg_type
            ))),
        }
    }

    fn into_error(self) -> ClientError {
        match flatbuffers::root::<fb::ErrorResponse<'_>>(&self.body) {
            Ok(e) => ClientError::Server {
                code: ErrorCode::from_u16(e.code()),
                raw_code: e.code(),
                message: e.message().unwrap_or("").to_owned(),
            },
            Err(e) => ClientError::Protocol(e.to_string()),
        }
    }
}

/// Reads one whole response frame from `r`.
pub fn read_response(r: &mut impl Read) -> Result<Response, ClientError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let header =
        FrameHeader::decode(&h, u32::MAX).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; header.body_len as usize];
    r.read_exact(&mut body)?;
    Ok(Response {
        msg_type: header.msg_type,
        request_id: header.request_id,
        body,
    })
}

/// One connection. Requests may be pipelined: [`Connection::send`] many, then
/// [`Connection::recv`] the answers in whatever order the server sends them.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    next_id: u64,
    out: Vec<u8>,
    held: HashMap<u64, Response>,
}

impl Connection {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> Result<Connection, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            next_id: 1,
            out: Vec::with_capacity(4096),
            held: HashMap::new(),
        })
    }

    /// Sets a read timeout for [`Self::recv`].
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(t)?;
        Ok(())
    }

    /// Sends a frame and returns its request id.
    pub fn send(&mut self, msg: MessageType, body: &[u8]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        write_frame(&mut self.out, msg, id, body);
        self.stream.write_all(&self.out)?;
        Ok(id)
    }

    /// Sends raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    fn read_frame(&mut self) -> Result<Response, ClientError> {
        read_response(&mut self.stream)
    }

    /// Receives the next response, whatever its id.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        if let Some(&id) = self.held.keys().next() {
            return Ok(self.held.remove(&id).expect("present"));
        }
        self.read_frame()
    }

    /// Receives the response to request `id`, holding others for later.
    pub fn recv_id(&mut self, id: u64) -> Result<Response, ClientError> {
        if let Some(r) = self.held.remove(&id) {
            return Ok(r);
        }
        loop {
            let r = self.read_frame()?;
            if r.request_id == id {
                return Ok(r);
            }
            self.held.insert(r.request_id, r);
        }
    }

    /// Scores one request and waits for its answer.
    pub fn score(&mut self, req: &ScoreRequest) -> Result<ScoreResult, ClientError> {
        let body = req.encode()?;
        let id = self.send(MessageType::ScoreRequest, &body)?;
        self.recv_id(id)?.into_score()
    }

    /// Round trip of a ping.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        let id = self.send(MessageType::Ping, &[])?;
        let r = self.recv_id(id)?;
        if r.msg_type == MessageType::Pong as u8 {
            Ok(())
        } else {
            Err(ClientError::Protocol(format!(
                "expected pong, got type {}",
                r.msg_type
            )))
        }
    }

    /// Sends a status request and reads the StatusResponse through `read`.
    fn with_status<T>(
        &mut self,
        model: &str,
        read: impl FnOnce(fb::StatusResponse<'_>) -> T,
    ) -> Result<T, ClientError> {
        let mut fbb = FlatBufferBuilder::new();
        let m = fbb.create_string(model);
        let r = fb::StatusRequest::create(&mut fbb, &fb::StatusRequestArgs { model: Some(m) });
        fbb.finish(r, None);
        let id = self.send(MessageType::StatusRequest, fbb.finished_data())?;
        let resp = self.recv_id(id)?;
        if resp.msg_type != MessageType::StatusResponse as u8 {
            return Err(resp.into_error());
        }
        let s = flatbuffers::root::<fb::StatusResponse<'_>>(&resp.body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(read(s))
    }

    /// The server's model status (every model when `model` is empty), as
    /// `(name, [(version, kind)], [(label, version, weight)])`.
    #[allow(clippy::type_complexity)]
    pub fn status(
        &mut self,
        model: &str,
    ) -> Result<Vec<(String, Vec<(u64, String)>, Vec<(String, u64, u32)>)>, ClientError> {
        self.with_status(model, |s| {
            s.models()
                .iter()
                .flatten()
                .map(|m| {
                    (
                        m.name().to_owned(),
                        m.versions()
                            .iter()
                            .flatten()
                            .map(|v| (v.version(), v.kind().unwrap_or("").to_owned()))
                            .collect(),
                        m.labels()
                            .iter()
                            .flatten()
                            .map(|l| (l.name().to_owned(), l.version(), l.weight()))
                            .collect(),
                    )
                })
                .collect()
        })
    }

    /// The raw features each loaded version of `model` reads, from the status response:
    /// `(version, [(name, declared type, wire kind)])`. Every feature may be sent at the request
    /// level or per item.
    #[allow(clippy::type_complexity)]
    pub fn schema(
        &mut self,
        model: &str,
    ) -> Result<Vec<(u64, Vec<(String, String, u8)>)>, ClientError> {
        self.with_status(model, |s| {
            s.models()
                .iter()
                .flatten()
                .filter(|m| m.name() == model)
                .flat_map(|m| m.versions().into_iter().flatten())
                .map(|v| {
                    let features = v
                        .features()
                        .iter()
                        .flatten()
                        .map(|f| {
                            (
                                f.name().to_owned(),
                                f.type_().unwrap_or("").to_owned(),
                                f.kind().0,
                            )
                        })
                        .collect();
                    (v.version(), features)
                })
                .collect()
        })
    }
}

/// A pool of connections to one server.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl Pool {
    /// A pool keeping up to `max_idle` idle connections.
    pub fn new(addr: SocketAddr, max_idle: usize) -> Pool {
        Pool {
            addr,
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// Runs `f` on a pooled connection; the connection returns to the pool unless `f` failed
    /// with an I/O or protocol error.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match conn {
            Some(c) => c,
            None => Connection::connect(self.addr)?,
        };
        let r = f(&mut conn);
        let reusable = !matches!(r, Err(ClientError::Io(_)) | Err(ClientError::Protocol(_)));
        if reusable {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        r
    }

    /// Scores one request on a pooled connection.
    pub fn score(&self, req: &ScoreRequest) -> Result<ScoreResult, ClientError> {
        self.with(|c| c.score(req))
    }
}
