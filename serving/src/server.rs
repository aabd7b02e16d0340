//! The daemon: one monoio runtime per core (io_uring, or epoll where io_uring is unavailable),
//! each with its own SO_REUSEPORT listener, its own engine and its own batcher. Cores share
//! nothing mutable; the model registry reaches each core as an immutable snapshot.
//!
//! Per connection: a reader task parses frames out of a buffer (pipelined requests), answers
//! pings, status and bad requests at once, and queues score requests on the core's batcher; a
//! writer task sends whatever responses are ready, in completion order (matched by request id).
//! The batcher merges queued requests of the same model version into one engine call.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use flatbuffers::FlatBufferBuilder;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

use crate::config::ServerConfig;
use crate::engine::cpu::CpuEngine;
use crate::engine::{BatchOutput, EngineError, InferenceBackend, Model, Request};
use crate::fbrequest::{verifier_options, FbRequest};
use crate::gen::rankd::rpc as fb;
use crate::metrics::Metrics;
use crate::protocol::{write_frame, ErrorCode, FrameHeader, MessageType, HEADER_LEN};
use crate::registry::{Registry, Selected};

/// State shared by every core and the admin thread.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: ServerConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// The registry snapshot being served.
    pub registry: Mutex<Arc<Registry>>,
    /// Set on SIGTERM/SIGINT.
    pub shutdown: AtomicBool,
    /// Requests read but not yet answered, all cores.
    pub inflight: AtomicUsize,
    /// Bumped whenever a new registry snapshot is published.
    pub generation: std::sync::atomic::AtomicU64,
    /// Recent request bodies per model, replayed on new versions before they serve.
    pub samples: crate::registry::WarmupSamples,
    /// The GPUs, when models run on GPUs.
    pub gpus: Option<Arc<rankd_engine::gpu::Gpus>>,
    /// Online updates: the consumers' state.
    pub updates: crate::updates::Updates,
}

impl Shared {
    /// The current registry snapshot.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A one-waiter wake-up flag for tasks on the same core.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn notified(&self) -> Notified<'_> {
        Notified(self)
    }
}

struct Notified<'a>(&'a Notify);

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.set.replace(false) {
            Poll::Ready(())
        } else {
            *self.0.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// The outgoing side of a connection: frames ready to send.
struct ConnOut {
    buf: RefCell<Vec<u8>>,
    /// Wakes the writer: a frame was queued, or the connection is closing.
    notify: Notify,
    /// Wakes the reader: a request was answered or a write completed (room under
    /// `max_pipelined` again), or the writer failed.
    space: Notify,
    closed: Cell<bool>,
    /// Requests read and queued on the batcher, not yet answered.
    inflight: Cell<usize>,
    /// Responses in `buf`, not yet handed to the socket.
    unsent: Cell<usize>,
    /// Responses in the write in progress.
    sending: Cell<usize>,
    /// When the last write completed.
    last_sent: Cell<Instant>,
}

impl ConnOut {
    fn new() -> ConnOut {
        ConnOut {
            buf: RefCell::default(),
            notify: Notify::default(),
            space: Notify::default(),
            closed: Cell::new(false),
            inflight: Cell::new(0),
            unsent: Cell::new(0),
            sending: Cell::new(0),
            last_sent: Cell::new(Instant::now()),
        }
    }

    fn push(&self, msg: MessageType, id: u64, body: &[u8]) {
        if self.closed.get() {
            return;
        }
        write_frame(&mut self.buf.borrow_mut(), msg, id, body);
        self.unsent.set(self.unsent.get() + 1);
        self.notify.notify();
    }

    /// Requests of this connection that hold memory in the daemon: queued, answered but not
    /// yet sent, or being sent. The reader stops at `max_pipelined`.
    fn pending(&self) -> usize {
        self.inflight.get() + self.unsent.get() + self.sending.get()
    }

    fn close(&self) {
        self.closed.set(true);
        self.buf.borrow_mut().clear();
        self.unsent.set(0);
        self.notify.notify();
        self.space.notify();
    }
}

fn error_body(fbb: &mut FlatBufferBuilder<'_>, code: ErrorCode, message: &str) -> Vec<u8> {
    fbb.reset();
    let m = fbb.create_string(message);
    let e = fb::ErrorResponse::create(
        fbb,
        &fb::ErrorResponseArgs {
            code: code as u16,
            message: Some(m),
        },
    );
    fbb.finish(e, None);
    fbb.finished_data().to_vec()
}

/// A queued score request.
struct Pending {
    selected: Selected,
    body: Vec<u8>,
    id: u64,
    items: usize,
    out: Rc<ConnOut>,
    received: Instant,
    deadline: Option<Instant>,
}

/// Per-core batcher.
struct Batcher {
    queue: RefCell<Vec<Pending>>,
    notify: Notify,
}

struct Core {
    shared: Arc<Shared>,
    registry: RefCell<Arc<Registry>>,
    /// The generation of `registry`.
    generation: Cell<u64>,
    batcher: Batcher,
    connections: Cell<usize>,
    inflight: Cell<usize>,
    /// Set once this core stops accepting; connections waiting to read are woken through
    /// their entry in `stop_notifies`.
    stopping: Cell<bool>,
    stop_notifies: RefCell<Vec<std::rc::Weak<Notify>>>,
    /// Answered requests since this core last offered a warm-up sample.
    since_sample: Cell<u32>,
}

impl Core {
    /// Takes the newest registry snapshot if one was published since the last request.
    fn refresh(&self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.generation.get() {
            *self.registry.borrow_mut() = self.shared.registry();
            self.generation.set(g);
        }
    }

    fn finish_request(&self, out: &ConnOut) {
        out.inflight.set(out.inflight.get().saturating_sub(1));
        out.space.notify();
        self.inflight.set(self.inflight.get().saturating_sub(1));
        self.shared.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Handles one complete frame: answers it at once or queues it on the batcher.
    fn handle_frame(
        &self,
        header: FrameHeader,
        body: Vec<u8>,
        out: &Rc<ConnOut>,
        fbb: &mut FlatBufferBuilder<'_>,
    ) {
        let id = header.request_id;
        self.refresh();
        match MessageType::from_u8(header.msg_type) {
            Some(MessageType::Ping) => out.push(MessageType::Pong, id, &[]),
            Some(MessageType::StatusRequest) => {
                // An empty body asks for every model; any other body must be a StatusRequest.
                let filter = if body.is_empty() {
                    Ok(String::new())
                } else {
                    flatbuffers::root_with_opts::<fb::StatusRequest<'_>>(&verifier_options(), &body)
                        .map(|r| r.model().unwrap_or("").to_owned())
                };
                match filter {
                    Ok(filter) => {
                        let body = status_body(fbb, &self.registry.borrow(), &filter);
                        out.push(MessageType::StatusResponse, id, &body);
                    }
                    Err(e) => {
                        let e = error_body(
                            fbb,
                            ErrorCode::MalformedRequest,
                            &format!(
                                "the body is not a StatusRequest: {}",
                                e.to_string().trim_end()
                            ),
                        );
                        out.push(MessageType::Error, id, &e);
                    }
                }
            }
            Some(MessageType::ScoreRequest) => self.score_request(id, body, out, fbb),
            _ => {
                let e = error_body(
                    fbb,
                    ErrorCode::UnsupportedMessage,
                    &format!("message type {} is not a request", header.msg_type),
                );
                out.push(MessageType::Error, id, &e);
            }
        }
    }

    fn reject(
        &self,
        out: &ConnOut,
        id: u64,
        fbb: &mut FlatBufferBuilder<'_>,
        model: &str,
        code: ErrorCode,
        msg: &str,
    ) {
        self.shared.metrics.count(model, 0, code.as_str(), 1);
        let e = error_body(fbb, code, msg);
        out.push(MessageType::Error, id, &e);
    }

    fn score_request(
        &self,
        id: u64,
        body: Vec<u8>,
        out: &Rc<ConnOut>,
        fbb: &mut FlatBufferBuilder<'_>,
    ) {
        let received = Instant::now();
        let limits = &self.shared.config.limits;
        let req =
            match flatbuffers::root_with_opts::<fb::ScoreRequest<'_>>(&verifier_options(), &body) {
                Ok(r) => r,
                Err(e) => {
                    return self.reject(
                        out,
                        id,
                        fbb,
                        "",
                        ErrorCode::MalformedRequest,
                        &format!(
                            "the body is not a ScoreRequest: {}",
                            e.to_string().trim_end()
                        ),
                    )
                }
            };
        let model = req.model().to_owned();
        if self.shared.shutdown.load(Ordering::Relaxed) {
            return self.reject(
                out,
                id,
                fbb,
                &model,
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            );
        }
        let items = req.num_items() as usize;
        if items > limits.max_items {
            return self.reject(
                out,
                id,
                fbb,
                &model,
                ErrorCode::LimitExceeded,
                &format!("{items} items, more than the limit of {}", limits.max_items),
            );
        }
        let features = req.user().map_or(0, |u| u.len()) + req.items().map_or(0, |u| u.len());
        if features > limits.max_features {
            return self.reject(
                out,
                id,
                fbb,
                &model,
                ErrorCode::LimitExceeded,
                &format!(
                    "{features} features, more than the limit of {}",
                    limits.max_features
                ),
            );
        }
        let selected = match self.registry.borrow().select(
            &model,
            req.version(),
            req.label().unwrap_or(""),
            req.routing_key().unwrap_or("").as_bytes(),
        ) {
            Ok(s) => s,
            Err((code, msg)) => return self.reject(out, id, fbb, &model, code, &msg),
        };
        let deadline = match req.deadline_us() {
            0 => None,
            us => Some(received + Duration::from_micros(us)),
        };
        out.inflight.set(out.inflight.get() + 1);
        self.inflight.set(self.inflight.get() + 1);
        self.shared.inflight.fetch_add(1, Ordering::Relaxed);
        self.batcher.queue.borrow_mut().push(Pending {
            selected,
            body,
            id,
            items,
            out: out.clone(),
            received,
            deadline,
        });
        self.batcher.notify.notify();
    }

    /// Scores everything queued, in engine calls of at most `max_batch_items` items.
    async fn run_batches(
        &self,
        engine: &mut CoreEngine,
        output: &mut BatchOutput,
        fbb: &mut FlatBufferBuilder<'_>,
    ) {
        let max_items = self.shared.config.batching.max_batch_items.max(1);
        loop {
            let batch: Vec<Pending> = {
                let mut q = self.batcher.queue.borrow_mut();
                // Nobody reads the answers of a connection whose writer failed (reset by the
                // peer): do not score them.
                q.retain(|p| {
                    if p.out.closed.get() {
                        self.finish_request(&p.out);
                        false
                    } else {
                        true
                    }
                });
                if q.is_empty() {
                    return;
                }
                // Take the first request's model version and every queued request of the same
                // version, up to the item budget.
                let model = q[0].selected.model.clone();
                let mut taken = Vec::new();
                let mut items = 0;
                let mut i = 0;
                while i < q.len() {
                    if Arc::ptr_eq(&q[i].selected.model, &model)
                        && (taken.is_empty() || items + q[i].items <= max_items)
                    {
                        items += q[i].items;
                        taken.push(q.remove(i));
                    } else {
                        i += 1;
                    }
                }
                taken
            };
            self.score_batch(batch, engine, output, fbb).await;
        }
    }

    async fn score_batch(
        &self,
        batch: Vec<Pending>,
        engine: &mut CoreEngine,
        output: &mut BatchOutput,
        fbb: &mut FlatBufferBuilder<'_>,
    ) {
        let model = batch[0].selected.model.clone();
        let version = batch[0].selected.version;
        let name = model.name().to_owned();
        let now = Instant::now();
        let mut views: Vec<Option<FbRequest<'_>>> = Vec::with_capacity(batch.len());
        let mut failures: Vec<Option<(ErrorCode, String)>> = Vec::with_capacity(batch.len());
        for p in &batch {
            if p.deadline.is_some_and(|d| d < now) {
                views.push(None);
                failures.push(Some((
                    ErrorCode::DeadlineExceeded,
                    "the deadline passed before the request was scored".into(),
                )));
                continue;
            }
            // SAFETY: the body was accepted by the FlatBuffers verifier in `score_request` and
            // has not been modified since (it moved here by value).
            let req = unsafe { flatbuffers::root_unchecked::<fb::ScoreRequest<'_>>(&p.body) };
            match FbRequest::new(model.features(), req) {
                Ok(v) => {
                    views.push(Some(v));
                    failures.push(None);
                }
                Err(e) => {
                    views.push(None);
                    failures.push(Some((ErrorCode::BadFeature, e.0)));
                }
            }
        }
        let reqs: Vec<&dyn Request> = views
            .iter()
            .filter_map(|v| v.as_ref().map(|v| v as &dyn Request))
            .collect();
        output.clear();
        let items: usize = reqs.iter().map(|r| r.num_items()).sum();
        let started = Instant::now();
        engine.score(&model, &reqs, output).await;
        let spent = started.elapsed();
        let scored = reqs.len() as u64;
        drop(reqs);
        self.shared.metrics.batch_items.observe(items as u64);
        let mut next = 0;
        let mut ok = 0u64;
        let mut ok_items = 0u64;
        let mut errors: Vec<&'static str> = Vec::new();
        let head_names = model.heads();
        for (p, failure) in batch.iter().zip(failures) {
            let result = match failure {
                Some(f) => Err(f),
                None => {
                    let r = output.get(next).map(|s| (s, next)).map_err(|e| match e {
                        EngineError::Device(_) => (ErrorCode::Internal, e.to_string()),
                        _ => (ErrorCode::BadFeature, e.to_string()),
                    });
                    next += 1;
                    r
                }
            };
            match result {
                Ok((scores, index)) => {
                    ok_items += scores.len() as u64;
                    fbb.reset();
                    let m = fbb.create_string(&name);
                    let s = fbb.create_vector(scores);
                    // A multi-task model: the default head's name and the other heads.
                    let (head, heads) = match head_names.split_first() {
                        None => (None, None),
                        Some((first, rest)) => {
                            let mut list = Vec::with_capacity(rest.len());
                            for (h, n) in rest.iter().enumerate() {
                                let values = match output.head(index, h + 1) {
                                    Some(Ok(v)) => v,
                                    _ => &[],
                                };
                                let name = fbb.create_string(n);
                                let scores = fbb.create_vector(values);
                                list.push(fb::HeadScores::create(
                                    fbb,
                                    &fb::HeadScoresArgs {
                                        name: Some(name),
                                        scores: Some(scores),
                                    },
                                ));
                            }
                            (
                                Some(fbb.create_string(first)),
                                Some(fbb.create_vector(&list)),
                            )
                        }
                    };
                    let r = fb::ScoreResponse::create(
                        fbb,
                        &fb::ScoreResponseArgs {
                            model: Some(m),
                            version,
                            scores: Some(s),
                            head,
                            heads,
                        },
                    );
                    fbb.finish(r, None);
                    p.out
                        .push(MessageType::ScoreResponse, p.id, fbb.finished_data());
                    ok += 1;
                    let n = self.since_sample.get() + 1;
                    if n >= crate::registry::WarmupSamples::EVERY {
                        self.shared.samples.offer(&name, &p.body);
                        self.since_sample.set(0);
                    } else {
                        self.since_sample.set(n);
                    }
                }
                Err((code, msg)) => {
                    let e = error_body(fbb, code, &msg);
                    p.out.push(MessageType::Error, p.id, &e);
                    errors.push(code.as_str());
                }
            }
            self.shared
                .metrics
                .latency_us
                .observe(p.received.elapsed().as_micros() as u64);
            self.finish_request(&p.out);
        }
        if ok > 0 {
            self.shared.metrics.count(&name, version, "ok", ok);
        }
        if scored > 0 {
            self.shared.metrics.record_execution(
                &name,
                version,
                ok,
                scored.saturating_sub(ok),
                ok_items,
                spent,
            );
        }
        for code in errors {
            self.shared.metrics.count(&name, version, code, 1);
        }
    }
}

/// The wire `Kind` a client sends a feature of declared type `ty` as (a float feature also
/// takes `I64`).
pub fn wire_kind(ty: rankd_feature_ops::FeatureType) -> fb::Kind {
    use rankd_feature_ops::FeatureType as T;
    match ty {
        T::Float => fb::Kind::F64,
        T::Int => fb::Kind::I64,
        T::String => fb::Kind::Str,
        T::IntList => fb::Kind::I64List,
        T::StringList => fb::Kind::StrList,
    }
}

fn status_body(fbb: &mut FlatBufferBuilder<'_>, reg: &Registry, filter: &str) -> Vec<u8> {
    fbb.reset();
    let mut models = Vec::new();
    for (name, e) in &reg.models {
        if !filter.is_empty() && filter != name {
            continue;
        }
        let versions: Vec<_> = e
            .versions
            .iter()
            .map(|(v, m)| {
                let state = fbb.create_string("serving");
                let kind = fbb.create_string(m.file().spec().architecture.kind());
                let features: Vec<_> = m
                    .file()
                    .spec()
                    .features
                    .features
                    .iter()
                    .map(|f| {
                        let name = fbb.create_string(&f.name);
                        let ty = fbb.create_string(f.ty.as_str());
                        fb::FeatureInfo::create(
                            fbb,
                            &fb::FeatureInfoArgs {
                                name: Some(name),
                                type_: Some(ty),
                                kind: wire_kind(f.ty),
                            },
                        )
                    })
                    .collect();
                let features = fbb.create_vector(&features);
                let names = m.heads();
                let heads = (!names.is_empty()).then(|| {
                    let names: Vec<_> = names.iter().map(|n| fbb.create_string(n)).collect();
                    fbb.create_vector(&names)
                });
                fb::VersionStatus::create(
                    fbb,
                    &fb::VersionStatusArgs {
                        version: *v,
                        state: Some(state),
                        mapped_bytes: m.file().mapped_len(),
                        kind: Some(kind),
                        features: Some(features),
                        heads,
                    },
                )
            })
            .collect();
        let versions = fbb.create_vector(&versions);
        let labels: Vec<_> = e
            .labels
            .iter()
            .map(|(l, v)| {
                let weight = e.split.iter().find(|(s, _)| s == l).map_or(0, |(_, w)| *w);
                let n = fbb.create_string(l);
                fb::Label::create(
                    fbb,
                    &fb::LabelArgs {
                        name: Some(n),
                        version: *v,
                        weight,
                    },
                )
            })
            .collect();
        let labels = fbb.create_vector(&labels);
        let n = fbb.create_string(name);
        models.push(fb::ModelStatus::create(
            fbb,
            &fb::ModelStatusArgs {
                name: Some(n),
                versions: Some(versions),
                labels: Some(labels),
                default_version: e.route(b"").unwrap_or(0),
            },
        ));
    }
    let models = fbb.create_vector(&models);
    let r = fb::StatusResponse::create(
        fbb,
        &fb::StatusResponseArgs {
            models: Some(models),
        },
    );
    fbb.finish(r, None);
    fbb.finished_data().to_vec()
}

/// Writes `buf` whole, or gives up after `limit` (cancelling the write and waiting for it, so
/// the buffer comes back): `Err(None)` when the client took nothing for that long.
async fn write_within(
    wr: &mut monoio::net::tcp::TcpOwnedWriteHalf,
    buf: Vec<u8>,
    limit: Option<Duration>,
) -> (Result<(), Option<std::io::Error>>, Vec<u8>) {
    let Some(limit) = limit else {
        let (res, buf) = AsyncWriteRentExt::write_all(wr, buf).await;
        return (res.map(drop).map_err(Some), buf);
    };
    let canceller = monoio::io::Canceller::new();
    let mut write = std::pin::pin!(monoio::io::CancelableAsyncWriteRentExt::write_all(
        wr,
        buf,
        canceller.handle()
    ));
    let mut timer = std::pin::pin!(monoio::time::sleep(limit));
    let done = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = write.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await;
    match done {
        Some((res, buf)) => (res.map(drop).map_err(Some), buf),
        None => {
            let _ = canceller.cancel();
            let (_, buf) = write.await;
            (Err(None), buf)
        }
    }
}

async fn writer_task(
    mut wr: monoio::net::tcp::TcpOwnedWriteHalf,
    out: Rc<ConnOut>,
    core: Rc<Core>,
) {
    let limits = &core.shared.config.limits;
    let write_timeout =
        (limits.write_timeout_ms > 0).then(|| Duration::from_millis(limits.write_timeout_ms));
    let mut spare = Vec::with_capacity(64 << 10);
    loop {
        if out.buf.borrow().is_empty() {
            if out.closed.get() {
                break;
            }
            out.notify.notified().await;
            continue;
        }
        std::mem::swap(&mut spare, &mut *out.buf.borrow_mut());
        out.sending.set(out.unsent.replace(0));
        let (res, buf) = write_within(&mut wr, spare, write_timeout).await;
        spare = buf;
        spare.clear();
        out.sending.set(0);
        if let Err(e) = res {
            if e.is_none() {
                eprintln!(
                    "rankd: closing connection: its client took no answer for {} ms",
                    limits.write_timeout_ms
                );
                core.shared
                    .metrics
                    .write_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
            out.close();
            break;
        }
        out.last_sent.set(Instant::now());
        out.space.notify();
    }
    let _ = wr.shutdown().await;
}

/// Why a read ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// The deadline passed.
    Deadline,
    /// The core is stopping.
    Stop,
}

/// Reads into `buf` until data arrives, `deadline` passes or `stop` is notified. An early end
/// cancels the read and waits for it to finish, so that bytes the kernel already copied are
/// kept and the buffer comes back: with io_uring a read dropped while in flight would lose
/// both.
async fn read_until<T: monoio::buf::IoBufMut>(
    rd: &mut monoio::net::tcp::TcpOwnedReadHalf,
    buf: T,
    deadline: Option<Instant>,
    stop: Option<&Notify>,
) -> (std::io::Result<usize>, T, Option<Wake>) {
    use monoio::io::CancelableAsyncReadRent;
    let canceller = monoio::io::Canceller::new();
    let mut read = std::pin::pin!(rd.cancelable_read(buf, canceller.handle()));
    let wake = {
        let mut sleep = std::pin::pin!(async {
            match deadline {
                Some(d) => monoio::time::sleep(d.saturating_duration_since(Instant::now())).await,
                None => std::future::pending().await,
            }
        });
        let mut stopped = std::pin::pin!(async {
            match stop {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        });
        std::future::poll_fn(|cx| {
            if let Poll::Ready((res, buf)) = read.as_mut().poll(cx) {
                return Poll::Ready(Ok((res, buf)));
            }
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Wake::Stop));
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Wake::Deadline));
            }
            Poll::Pending
        })
        .await
    };
    match wake {
        Ok((res, buf)) => (res, buf, None),
        Err(why) => {
            let _ = canceller.cancel();
            let (res, buf) = read.await;
            (res, buf, Some(why))
        }
    }
}

/// Logs and counts a connection closed because a frame missed its deadline.
fn frame_stalled(core: &Core, read_timeout: Duration) {
    eprintln!(
        "rankd: closing connection: a frame did not complete within {} ms",
        read_timeout.as_millis()
    );
    core.shared
        .metrics
        .frame_errors
        .fetch_add(1, Ordering::Relaxed);
}

async fn connection(core: Rc<Core>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let out = Rc::new(ConnOut::new());
    let writer = monoio::spawn(writer_task(wr, out.clone(), core.clone()));
    let stop = Rc::new(Notify::default());
    {
        let mut list = core.stop_notifies.borrow_mut();
        list.retain(|w| w.strong_count() > 0);
        list.push(Rc::downgrade(&stop));
    }
    let limits = core.shared.config.limits.clone();
    let read_timeout = Duration::from_millis(limits.read_timeout_ms.max(1));
    let idle_timeout =
        (limits.idle_timeout_ms > 0).then(|| Duration::from_millis(limits.idle_timeout_ms));
    let max_pipelined = limits.max_pipelined.max(1);
    let mut inbuf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut start = 0usize;
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    // When the first byte of the incomplete frame at the end of `inbuf` arrived: the whole
    // frame, header and body, must arrive within `read_timeout_ms` of it.
    let mut frame_started: Option<Instant> = None;
    let mut last_activity = Instant::now();
    // When reading last resumed after waiting for room under `max_pipelined`: bytes buffered
    // before that wait do not start a frame's deadline earlier.
    let mut resumed = last_activity;
    // The idle deadline is not looked at again before this (set while answers are pending, so
    // that a client that does not read is not polled in a loop).
    let mut idle_check = last_activity;
    'conn: loop {
        // Every complete frame in the buffer, while this connection is under `max_pipelined`.
        let mut consumed = false;
        loop {
            if out.pending() >= max_pipelined {
                break;
            }
            let avail = inbuf.len() - start;
            if avail < HEADER_LEN {
                break;
            }
            let hb: &[u8; HEADER_LEN] = inbuf[start..start + HEADER_LEN]
                .try_into()
                .expect("HEADER_LEN bytes");
            let header = match FrameHeader::decode(hb, limits.max_frame_bytes) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("rankd: closing connection: {e}");
                    core.shared
                        .metrics
                        .frame_errors
                        .fetch_add(1, Ordering::Relaxed);
                    break 'conn;
                }
            };
            let total = HEADER_LEN + header.body_len as usize;
            if avail < total {
                // Make room for the whole frame at once.
                inbuf.reserve(total - avail);
                break;
            }
            let body = inbuf[start + HEADER_LEN..start + total].to_vec();
            start += total;
            consumed = true;
            core.handle_frame(header, body, &out, &mut fbb);
        }
        if start == inbuf.len() {
            inbuf.clear();
            start = 0;
            frame_started = None;
        } else {
            if consumed {
                // What is left started after a frame that completed in the last read.
                frame_started = Some(last_activity.max(resumed));
            }
            if start > (inbuf.capacity() / 2) {
                inbuf.drain(..start);
                start = 0;
            }
        }
        // Below the limit the parse stopped at an incomplete frame: one whose deadline passed
        // while its bytes trickled in is closed, however recently its last byte came.
        if inbuf.len() > start
            && out.pending() < max_pipelined
            && !core.stopping.get()
            && frame_started.is_some_and(|t| t.elapsed() > read_timeout)
        {
            frame_stalled(&core, read_timeout);
            break 'conn;
        }
        // Backpressure: at `max_pipelined` requests queued, answered-but-unsent or being sent,
        // read nothing more until the writer or the batcher makes room.
        if out.pending() >= max_pipelined {
            while out.pending() >= max_pipelined && !out.closed.get() {
                out.space.notified().await;
            }
            if out.closed.get() {
                break 'conn;
            }
            // Time spent waiting for room does not count against the frame in the buffer.
            resumed = Instant::now();
            if inbuf.len() > start {
                frame_started = Some(resumed);
            }
            continue 'conn;
        }
        // Read straight into the spare capacity of the frame buffer: no intermediate copy.
        if inbuf.capacity() - inbuf.len() < 16 << 10 {
            inbuf.reserve(64 << 10);
        }
        let partial = inbuf.len() > start;
        let stopping = core.stopping.get();
        let deadline = if stopping {
            // Take only what the client has already sent (those requests are answered with
            // ShuttingDown), then close.
            Some(Instant::now() + Duration::from_millis(20))
        } else if let (true, Some(t)) = (partial, frame_started) {
            Some(t + read_timeout)
        } else {
            // Idle: nothing from the client since the later of its last byte and the last
            // answer sent. While answers are pending the deadline is looked at again later.
            idle_timeout.map(|t| (last_activity.max(out.last_sent.get()) + t).max(idle_check))
        };
        let (len, cap) = (inbuf.len(), inbuf.capacity());
        let slice = monoio::buf::SliceMut::new(inbuf, len, cap);
        let (res, slice, woken) =
            read_until(&mut rd, slice, deadline, (!stopping).then_some(&*stop)).await;
        inbuf = slice.into_inner();
        match res {
            Ok(0) => break,
            Ok(_) => {
                last_activity = Instant::now();
                if !partial {
                    frame_started = Some(last_activity);
                }
            }
            Err(_) if woken.is_some() => {}
            Err(_) => {
                // A reset (not a half-close): nobody will read the answers, so the requests
                // still queued for this connection are not scored.
                out.close();
                break;
            }
        }
        if out.closed.get() {
            break;
        }
        if woken == Some(Wake::Deadline) && matches!(res, Err(_) | Ok(0)) {
            if stopping {
                break;
            }
            if !partial {
                if let Some(t) = idle_timeout {
                    let now = Instant::now();
                    if out.pending() > 0 {
                        // Answers are queued or unsent: not idle. Look again later.
                        idle_check = now + t;
                        continue 'conn;
                    }
                    if last_activity.max(out.last_sent.get()) + t > now {
                        // The last answer went out after this deadline was set.
                        continue 'conn;
                    }
                }
            }
            if partial {
                frame_stalled(&core, read_timeout);
            } else {
                core.shared
                    .metrics
                    .idle_closed
                    .fetch_add(1, Ordering::Relaxed);
            }
            break;
        }
    }
    // Let queued requests of this connection finish, then stop the writer.
    while out.inflight.get() > 0 {
        out.space.notified().await;
    }
    out.closed.set(true);
    out.notify.notify();
    let _ = writer.await;
    core.connections
        .set(core.connections.get().saturating_sub(1));
    core.shared
        .metrics
        .connections
        .fetch_sub(1, Ordering::Relaxed);
}

/// A core's engine: its own CPU engine, or its handle on the GPUs (which keeps a CPU engine
/// for the models no GPU holds).
enum CoreEngine {
    Cpu(CpuEngine),
    Gpu(rankd_engine::gpu::GpuCore),
}

impl CoreEngine {
    async fn score(&mut self, model: &Arc<Model>, reqs: &[&dyn Request], out: &mut BatchOutput) {
        match self {
            CoreEngine::Cpu(e) => e.score(model, reqs, out),
            // The core goes on reading and queueing while the GPU works.
            CoreEngine::Gpu(g) => g.score(model, reqs, out).await,
        }
    }
}

async fn batcher_task(core: Rc<Core>) {
    let mut engine = match &core.shared.gpus {
        Some(g) => CoreEngine::Gpu(g.core()),
        None => CoreEngine::Cpu(CpuEngine::new()),
    };
    let mut output = BatchOutput::default();
    let mut fbb = FlatBufferBuilder::with_capacity(64 << 10);
    let max_wait = Duration::from_micros(core.shared.config.batching.max_wait_us);
    loop {
        core.batcher.notify.notified().await;
        if !max_wait.is_zero() {
            let queued: usize = core.batcher.queue.borrow().iter().map(|p| p.items).sum();
            if queued < core.shared.config.batching.max_batch_items {
                monoio::time::sleep(max_wait).await;
            }
        }
        core.run_batches(&mut engine, &mut output, &mut fbb).await;
    }
}

async fn serve_core(core: Rc<Core>, listener: TcpListener) {
    monoio::spawn(batcher_task(core.clone()));
    let grace = Duration::from_millis(core.shared.config.shutdown_grace_ms);
    {
        // One accept stays in flight across the shutdown checks, and is cancelled and awaited,
        // never dropped: with io_uring an accept dropped after the kernel completed it would
        // leak the accepted socket, a connection that nobody ever reads or answers.
        let canceller = monoio::io::Canceller::new();
        let mut accept = Box::pin(listener.cancelable_accept(canceller.handle()));
        loop {
            // An idle core drops a replaced registry snapshot within a tick: otherwise it would
            // keep the old versions (their mappings, their GPU memory) until its next request.
            core.refresh();
            // Checked on every pass: a core that accepts a connection more often than every
            // 50 ms must still see the shutdown.
            if core.shared.shutdown.load(Ordering::Relaxed) {
                let _ = canceller.cancel();
                // An accept that completed anyway is closed: the server is stopping.
                drop(accept.await);
                break;
            }
            let got = {
                let mut tick = std::pin::pin!(monoio::time::sleep(Duration::from_millis(50)));
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = accept.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    tick.as_mut().poll(cx).map(|()| None)
                })
                .await
            };
            let accepted = match got {
                Some(r) => {
                    accept = Box::pin(listener.cancelable_accept(canceller.handle()));
                    r
                }
                None => continue,
            };
            match accepted {
                Ok((stream, _)) => {
                    if core.connections.get() >= core.shared.config.limits.max_connections {
                        core.shared
                            .metrics
                            .connections_refused
                            .fetch_add(1, Ordering::Relaxed);
                        eprintln!("rankd: connection limit reached; refusing a connection");
                        drop(stream);
                        continue;
                    }
                    core.connections.set(core.connections.get() + 1);
                    core.shared
                        .metrics
                        .connections
                        .fetch_add(1, Ordering::Relaxed);
                    monoio::spawn(connection(core.clone(), stream));
                }
                Err(e) => {
                    eprintln!("rankd: accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(listener);
    core.stopping.set(true);
    for n in core.stop_notifies.borrow_mut().drain(..) {
        if let Some(n) = n.upgrade() {
            n.notify();
        }
    }
    // Finish what was read before the signal and let every connection flush and close.
    let stop = Instant::now();
    while (core.inflight.get() > 0 || core.connections.get() > 0) && stop.elapsed() < grace {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Restricts the calling thread (and the threads it starts later) to `cpus`; a failure leaves
/// it where it was.
pub(crate) fn set_affinity(cpus: impl IntoIterator<Item = usize>) {
    // SAFETY: `set` is a plain bit set on a zeroed cpu_set_t and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Binds `addr` with SO_REUSEPORT on the calling core's runtime.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind_with_config(addr, &ListenerOpts::new().reuse_port(true))
}

/// Runs one core until shutdown. `ready` reports the bind result once.
fn run_core(
    shared: Arc<Shared>,
    index: usize,
    addr: std::net::SocketAddr,
    ready: std::sync::mpsc::Sender<std::io::Result<std::net::SocketAddr>>,
) {
    if shared.config.pin_cores {
        set_affinity([index]);
    }
    let body = move || async move {
        let listener = match bind(addr) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let local = listener.local_addr();
        let _ = ready.send(local);
        let generation = shared.generation.load(Ordering::Acquire);
        let registry = shared.registry();
        let core = Rc::new(Core {
            shared,
            registry: RefCell::new(registry),
            generation: Cell::new(generation),
            batcher: Batcher {
                queue: RefCell::new(Vec::new()),
                notify: Notify::default(),
            },
            connections: Cell::new(0),
            inflight: Cell::new(0),
            stopping: Cell::new(false),
            stop_notifies: RefCell::new(Vec::new()),
            since_sample: Cell::new(0),
        });
        serve_core(core, listener).await;
    };
    let uring = !shared_force_epoll() && io_uring_available();
    if uring {
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(mut rt) => return rt.block_on(body()),
            Err(e) => eprintln!("rankd: core {index}: io_uring runtime failed ({e}); using epoll"),
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(mut rt) => rt.block_on(body()),
        Err(e) => eprintln!("rankd: core {index}: cannot build a runtime: {e}"),
    }
}

thread_local! {
    static FORCE_EPOLL: Cell<bool> = const { Cell::new(false) };
}

fn shared_force_epoll() -> bool {
    FORCE_EPOLL.with(Cell::get)
}

/// Whether this kernel lets us create an io_uring.
pub fn io_uring_available() -> bool {
    monoio::utils::detect_uring()
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Shared state (metrics, registry, shutdown flag).
    pub shared: Arc<Shared>,
    /// The bound RPC address (with the real port when 0 was asked).
    pub addr: std::net::SocketAddr,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds every core's listener and starts serving `registry`.
    pub fn start(
        config: ServerConfig,
        registry: Registry,
        gpus: Option<Arc<rankd_engine::gpu::Gpus>>,
    ) -> std::io::Result<Server> {
        let shared = Arc::new(Shared {
            metrics: Metrics::default(),
            registry: Mutex::new(Arc::new(registry)),
            shutdown: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            generation: std::sync::atomic::AtomicU64::new(0),
            samples: Default::default(),
            gpus,
            updates: Default::default(),
            config,
        });
        let n = shared.config.worker_threads();
        let mut addr = shared.config.listen;
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            let s = shared.clone();
            let force_epoll = shared.config.force_epoll;
            let bind_addr = addr;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rankd-core-{i}"))
                    .spawn(move || {
                        FORCE_EPOLL.with(|f| f.set(force_epoll));
                        run_core(s, i, bind_addr, tx)
                    })?,
            );
            let bound = rx
                .recv()
                .map_err(|_| std::io::Error::other("a core exited before binding"))??;
            // Later cores bind the port the first one got (for port 0).
            addr = bound;
        }
        Ok(Server {
            shared,
            addr,
            threads,
        })
    }

    /// Asks every core to stop accepting and finish in-flight requests.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
    }

    /// Waits for every core to finish.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}
