//! Connection handling against the real `rankd` binary: peers that reset while being answered,
//! frames that trickle in, idle connections, and clients that send without reading.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rankd_formats::synth::ModelKind;
use rankd_serving::client::{read_response, Connection, FeatureValue, ScoreRequest};
use rankd_serving::protocol::{write_frame, MessageType};

mod common;
use common::{start_daemon, synth_model, Daemon};

fn start(root: &Path, config: &str, extra: &[&str]) -> Daemon {
    let path = root.join(".rankd.toml");
    std::fs::write(&path, config).unwrap();
    start_daemon(root, Some(&path), extra)
}

fn synth(root: &Path) {
    synth_model(root, "feed", ModelKind::DeepFm);
}

fn request(items: usize) -> ScoreRequest {
    ScoreRequest {
        model: "feed".into(),
        user: vec![
            ("user_age".into(), FeatureValue::F64(33.0)),
            ("user_city".into(), FeatureValue::Str("Tokyo".into())),
        ],
        items: (0..items)
            .map(|i| vec![("item_id".into(), FeatureValue::I64(i as i64))])
            .collect(),
        ..ScoreRequest::default()
    }
}

fn frames(body: &[u8], n: usize, first_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * (body.len() + 20));
    for i in 0..n {
        write_frame(
            &mut out,
            MessageType::ScoreRequest,
            first_id + i as u64,
            body,
        );
    }
    out
}

/// Closing with SO_LINGER 0 sends a reset instead of a FIN.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(stream);
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    common::metric(admin, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The scenario, many times over: a client resets its connection while the daemon
/// writes its answers, then well-behaved clients connect while the core is still busy with the
/// reset client's queue. Every one of them must be read and answered. With io_uring, an accept
/// dropped by a timeout after the kernel completed it leaked the new socket (never read, never
/// answered, never closed): this caught it in most runs on one core.
#[test]
fn a_reset_peer_never_strands_the_next_connections() {
    if !rankd_serving::server::io_uring_available() {
        println!("note: io_uring is not available here; the scenario runs on epoll");
    }
    let root = tempfile::tempdir().unwrap();
    synth(root.path());
    let d = start(
        root.path(),
        "[limits]\nmax_pipelined = 1000\n",
        &["--threads", "1"],
    );
    let big = request(2000).encode().unwrap();
    let rounds = 12;
    for round in 0..rounds {
        // A: many large requests, read a little of the answers, then reset.
        let mut a = TcpStream::connect(d.addr).unwrap();
        a.write_all(&frames(&big, 40, 1)).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let first = read_response(&mut a).unwrap();
        assert_eq!(first.msg_type, MessageType::ScoreResponse as u8);
        reset(a);
        // Clients arriving while the core scores A's queue: each must get its pong.
        let mut pingers = Vec::new();
        for _ in 0..8 {
            let mut c = Connection::connect(d.addr).unwrap();
            c.set_timeout(Some(Duration::from_secs(20))).unwrap();
            c.send(MessageType::Ping, &[]).unwrap();
            pingers.push(c);
            std::thread::sleep(Duration::from_millis(3));
        }
        // B: pipelines 40 requests of 2,000 items and must get all 40 answers.
        let mut b = TcpStream::connect(d.addr).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        b.write_all(&frames(&big, 40, 1000)).unwrap();
        let mut ids = Vec::new();
        for _ in 0..40 {
            match read_response(&mut b) {
                Ok(r) => {
                    assert_eq!(r.msg_type, MessageType::ScoreResponse as u8);
                    ids.push(r.request_id);
                }
                Err(e) => panic!("round {round}: B got {} of 40 answers: {e}", ids.len()),
            }
        }
        ids.sort_unstable();
        assert_eq!(ids, (1000..1040).collect::<Vec<u64>>());
        for (i, mut c) in pingers.into_iter().enumerate() {
            let r = c
                .recv()
                .unwrap_or_else(|e| panic!("round {round}: client {i} got no pong: {e}"));
            assert_eq!(r.msg_type, MessageType::Pong as u8);
        }
    }
    // Every accepted socket is a counted connection: none leaked.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(d.admin, "rankd_connections"), 0.0);
}

/// Reads until the daemon closes the connection; returns how long that took.
fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A frame must arrive whole within `read_timeout_ms` of its first byte: a client sending a
/// byte every 100 ms is closed at the deadline, not kept alive by each byte. Slow clients at the
/// connection limit therefore cannot lock others out for longer than that.
#[test]
fn trickling_frames_are_closed_at_their_deadline() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path());
    let d = start(
        root.path(),
        "[limits]\nmax_connections = 4\nread_timeout_ms = 600\n",
        &["--threads", "1"],
    );
    let frame = frames(&request(3).encode().unwrap(), 1, 7);
    let addr = d.addr;
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let frame = frame.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let start = Instant::now();
                for &byte in &frame {
                    if s.write_all(&[byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    if start.elapsed() > Duration::from_secs(5) {
                        break;
                    }
                }
                time_to_close(&mut s, Duration::from_secs(1)).map(|_| start.elapsed())
            })
        })
        .collect();
    for h in slow {
        let closed_after = h
            .join()
            .unwrap()
            .expect("a trickling client was never closed");
        assert!(
            closed_after < Duration::from_secs(3),
            "closed only after {closed_after:?}"
        );
    }
    // The slots are free again.
    let mut c = Connection::connect(d.addr).unwrap();
    c.set_timeout(Some(Duration::from_secs(5))).unwrap();
    c.ping().unwrap();
    assert!(metric(d.admin, "rankd_frame_errors_total") >= 4.0);
}

/// A connection that sends nothing is closed after `idle_timeout_ms`; one that keeps talking
/// (complete frames) stays open however long it lives.
#[test]
fn idle_connections_are_bounded_separately() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path());
    let d = start(
        root.path(),
        "[limits]\nidle_timeout_ms = 500\nread_timeout_ms = 10000\n",
        &["--threads", "1"],
    );
    let mut idle = TcpStream::connect(d.addr).unwrap();
    // One that sends a request, reads its answer, then goes quiet: idle from then on.
    let mut once = TcpStream::connect(d.addr).unwrap();
    let mut ping = Vec::new();
    write_frame(&mut ping, MessageType::Ping, 1, &[]);
    once.write_all(&ping).unwrap();
    once.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        read_response(&mut once).unwrap().msg_type,
        MessageType::Pong as u8
    );
    let mut busy = Connection::connect(d.addr).unwrap();
    busy.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        busy.ping().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = time_to_close(&mut idle, Duration::from_secs(1));
    assert!(t.is_some(), "the idle connection is still open");
    let t = time_to_close(&mut once, Duration::from_secs(1));
    assert!(
        t.is_some(),
        "the connection idle after one request is still open"
    );
    busy.ping().unwrap();
    assert_eq!(metric(d.admin, "rankd_connections_idle_closed_total"), 2.0);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A TCP connection whose socket buffers are set small before it connects, so that the kernel
/// holds little of what the daemon sends it.
fn small_buffered(addr: SocketAddr, bytes: libc::c_int) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 expected")
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped in a
    // TcpStream; the option values and the address are correctly sized.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(rc, 0);
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

fn scored(admin: SocketAddr) -> f64 {
    metric(
        admin,
        "rankd_requests_total{model=\"wide\",version=\"1\",outcome=\"ok\"}",
    )
}

/// The kernel's largest automatic send buffer (`tcp_wmem`'s maximum).
fn max_send_buffer() -> f64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4_194_304.0)
}

/// A client that sends up to 20,000 small requests with large answers (10,000 items each, no
/// item features) and reads nothing: the daemon reads no further once `max_pipelined` requests
/// are queued, answered-but-unsent or being sent, so what it holds for the connection is
/// bounded by the limits; when the client finally reads, every answer arrives.
#[test]
fn a_client_that_does_not_read_is_bounded_by_max_pipelined() {
    let root = tempfile::tempdir().unwrap();
    synth_model(root.path(), "wide", ModelKind::Wide);
    let d = start(
        root.path(),
        "[limits]\nmax_pipelined = 16\nmax_items = 10000\n",
        &["--threads", "1"],
    );
    let pid = d.child.id();
    let items = 10_000;
    let request = ScoreRequest {
        model: "wide".into(),
        items: vec![vec![]; items],
        ..ScoreRequest::default()
    };
    // Warm up (first-request plans, thread stacks) before the baseline.
    let mut warm = Connection::connect(d.addr).unwrap();
    assert_eq!(warm.score(&request).unwrap().scores.len(), items);
    drop(warm);
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(pid);
    let scored_before = scored(d.admin);

    let body = request.encode().unwrap();
    let total = 20_000usize;
    let mut s = small_buffered(d.addr, 16 << 10);
    s.set_nonblocking(true).unwrap();
    let all = frames(&body, total, 1);
    let frame_len = all.len() / total;
    let mut sent = 0usize;
    let start = Instant::now();
    // Write until the daemon stops reading (the socket buffers fill up), for at most 6 s.
    let mut stalled_since = Instant::now();
    while sent < all.len() && start.elapsed() < Duration::from_secs(6) {
        match s.write(&all[sent..]) {
            Ok(n) => {
                sent += n;
                stalled_since = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stalled_since.elapsed() > Duration::from_secs(1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    // Give an unbounded daemon time to show it: it would go on reading and answering.
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_kib(pid);
    let answered = scored(d.admin) - scored_before;
    let frames_sent = sent / frame_len;
    assert!(
        frames_sent < total,
        "the daemon read all {total} requests of a client that reads nothing"
    );
    // What the daemon may answer before it stops: max_pipelined, plus what the kernel's socket
    // buffers between it and the client hold (an answer is 40 KB).
    let answer_bytes = (items * 4) as f64;
    let bound = 16.0 + (max_send_buffer() + (64 << 10) as f64) / answer_bytes + 4.0;
    assert!(
        answered <= bound,
        "{answered} requests answered for a client that reads nothing (bound {bound:.0}, \
         {frames_sent} written)"
    );
    let growth_mib = during.saturating_sub(before) as f64 / 1024.0;
    assert!(
        growth_mib < 16.0,
        "RSS grew {growth_mib:.1} MiB with {frames_sent} requests written"
    );
    eprintln!(
        "{frames_sent} requests written, {answered} answered (bound {bound:.0}), RSS +{growth_mib:.1} MiB"
    );

    // Now read everything: every request written gets its answer, none lost.
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = s.try_clone().unwrap();
    // Finish the frame in progress so that every request sent is whole.
    let whole = sent.div_ceil(frame_len) * frame_len;
    let tail = all[sent..whole.min(all.len())].to_vec();
    let writer = std::thread::spawn(move || s.write_all(&tail).unwrap());
    let expected = whole / frame_len;
    let mut seen = vec![false; expected];
    for _ in 0..expected {
        let r = read_response(&mut reader).unwrap();
        assert_eq!(r.msg_type, MessageType::ScoreResponse as u8);
        let i = r.request_id as usize - 1;
        assert!(!seen[i], "answer {i} twice");
        seen[i] = true;
    }
    writer.join().unwrap();
}

/// A client that sends requests and never reads their answers is closed after
/// `write_timeout_ms`: its slot and its answers do not stay held forever.
#[test]
fn a_client_that_never_reads_is_closed_after_the_write_timeout() {
    let root = tempfile::tempdir().unwrap();
    synth_model(root.path(), "wide", ModelKind::Wide);
    let d = start(
        root.path(),
        "[limits]\nmax_pipelined = 16\nwrite_timeout_ms = 500\n",
        &["--threads", "1"],
    );
    let request = ScoreRequest {
        model: "wide".into(),
        items: vec![vec![]; 10_000],
        ..ScoreRequest::default()
    };
    let all = frames(&request.encode().unwrap(), 400, 1);
    let mut s = small_buffered(d.addr, 16 << 10);
    s.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let start_t = Instant::now();
    while sent < all.len() && start_t.elapsed() < Duration::from_secs(3) {
        match s.write(&all[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => break,
        }
    }
    let closed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        metric(d.admin, "rankd_connections") == 0.0
    });
    assert!(
        closed,
        "the connection of a client that reads nothing is still open"
    );
    assert!(metric(d.admin, "rankd_connections_write_timeouts_total") >= 1.0);
    drop(s);
    // The daemon serves others as before.
    let mut c = Connection::connect(d.addr).unwrap();
    c.set_timeout(Some(Duration::from_secs(5))).unwrap();
    c.ping().unwrap();
}
