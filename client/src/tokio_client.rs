//! The asynchronous client for tokio: [`AsyncConnection`] pipelines any number of concurrent
//! calls on one connection (answers matched by request id, in whatever order they come), and
//! [`AsyncPool`] spreads calls over several connections and reconnects the ones that failed.
//! Same requests, results and errors as the blocking client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{write_frame, FrameHeader, MessageType, HEADER_LEN};
use crate::{ClientError, Response, ScoreRequest, ScoreResult};

type Waiters = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>>;

/// One pipelined connection, shared by reference among concurrent tasks.
#[derive(Debug)]
pub struct AsyncConnection {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    waiters: Waiters,
    next_id: AtomicU64,
}

fn lost() -> ClientError {
    ClientError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the connection to rankd was lost",
    ))
}

impl AsyncConnection {
    /// Connects; a writer and a reader task run on the current tokio runtime until the
    /// connection is dropped or fails.
    pub async fn connect(addr: SocketAddr) -> Result<AsyncConnection, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let waiters: Waiters = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let w = waiters.clone();
        tokio::spawn(async move {
            let mut h = [0u8; HEADER_LEN];
            loop {
                if rd.read_exact(&mut h).await.is_err() {
                    break;
                }
                let Ok(header) = FrameHeader::decode(&h, u32::MAX) else {
                    break;
                };
                let mut body = vec![0u8; header.body_len as usize];
                if rd.read_exact(&mut body).await.is_err() {
                    break;
                }
                let waiter = w
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                    .and_then(|m| m.remove(&header.request_id));
                if let Some(tx) = waiter {
                    let _ = tx.send(Response {
                        msg_type: header.msg_type,
                        request_id: header.request_id,
                        body,
                    });
                }
            }
            // Fail every call still waiting, and every later one.
            w.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
        Ok(AsyncConnection {
            frames: tx,
            waiters,
            next_id: AtomicU64::new(1),
        })
    }

    /// Whether the connection has failed (calls on it fail at once).
    pub fn is_broken(&self) -> bool {
        self.frames.is_closed()
            || self
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
    }

    /// Sends one request frame and awaits its answer, at most `timeout` when given.
    pub async fn call(
        &self,
        msg: MessageType,
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(m) => m.insert(id, tx),
            None => return Err(lost()),
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
        write_frame(&mut frame, msg, id, body);
        if self.frames.send(frame).is_err() {
            return Err(lost());
        }
        let answer = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(m) = self
                        .waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                    {
                        m.remove(&id);
                    }
                    return Err(ClientError::Timeout);
                }
            },
            None => rx.await,
        };
        answer.map_err(|_| lost())
    }

    /// Scores one request. A request with `deadline_us` is also given up locally when the
    /// deadline passes (a little later than the server would, to let its answer arrive).
    pub async fn score(&self, req: &ScoreRequest) -> Result<ScoreResult, ClientError> {
        let body = req.encode()?;
        let timeout = (req.deadline_us > 0)
            .then(|| Duration::from_micros(req.deadline_us) + Duration::from_millis(50));
        self.call(MessageType::ScoreRequest, &body, timeout)
            .await?
            .into_score()
    }

    /// A ping round trip.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let r = self.call(MessageType::Ping, &[], None).await?;
        if r.msg_type == MessageType::Pong as u8 {
            Ok(())
        } else {
            Err(ClientError::Protocol(format!(
                "ping answered with message type {}",
                r.msg_type
            )))
        }
    }
}

/// Several pipelined connections to one or more servers: calls go round robin; a connection
/// that failed is replaced on its next turn (after `backoff`, doubling up to 5 s while the server
/// stays unreachable).
#[derive(Debug)]
pub struct AsyncPool {
    addrs: Vec<SocketAddr>,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next: AtomicUsize,
    backoff: Duration,
}

#[derive(Debug, Default)]
struct Slot {
    conn: Option<Arc<AsyncConnection>>,
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
}

impl AsyncPool {
    /// `per_addr` connections to each of `addrs`, opened lazily.
    pub fn new(addrs: &[SocketAddr], per_addr: usize) -> AsyncPool {
        let addrs: Vec<SocketAddr> = addrs
            .iter()
            .flat_map(|a| std::iter::repeat_n(*a, per_addr.max(1)))
            .collect();
        AsyncPool {
            slots: addrs.iter().map(|_| Default::default()).collect(),
            addrs,
            next: AtomicUsize::new(0),
            backoff: Duration::from_millis(50),
        }
    }

    async fn conn(&self) -> Result<Arc<AsyncConnection>, ClientError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = &slot.conn {
            if !c.is_broken() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if let Some(at) = slot.retry_at {
            if tokio::time::Instant::now() < at {
                return Err(lost());
            }
        }
        match AsyncConnection::connect(self.addrs[i]).await {
            Ok(c) => {
                let c = Arc::new(c);
                slot.conn = Some(c.clone());
                slot.failures = 0;
                slot.retry_at = None;
                Ok(c)
            }
            Err(e) => {
                slot.failures += 1;
                let wait = (self.backoff * 2u32.saturating_pow(slot.failures - 1))
                    .min(Duration::from_secs(5));
                slot.retry_at = Some(tokio::time::Instant::now() + wait);
                Err(e)
            }
        }
    }

    /// Scores one request on the next connection.
    pub async fn score(&self, req: &ScoreRequest) -> Result<ScoreResult, ClientError> {
        self.conn().await?.score(req).await
    }
}
