//! The tokio client (`rankd_client::AsyncConnection`, `AsyncPool`) against the real daemon:
//! concurrent pipelined calls get their own answers, equal to the blocking client's; server
//! errors carry their code; a restarted server is reconnected to.

use std::sync::Arc;

use rankd_client::{AsyncConnection, AsyncPool, ClientError, Connection};
use rankd_serving::client::{FeatureValue, ScoreRequest};
use rankd_serving::protocol::ErrorCode;

mod common;
use common::start_daemon;

fn request(i: usize) -> ScoreRequest {
    ScoreRequest {
        model: "adult".into(),
        user: vec![(
            "native-country".into(),
            FeatureValue::Str("United-States".into()),
        )],
        items: (0..1 + i % 7)
            .map(|j| {
                vec![
                    (
                        "age".into(),
                        FeatureValue::F64(20.0 + (i * 7 + j) as f64 % 50.0),
                    ),
                    (
                        "workclass".into(),
                        FeatureValue::Str(["Private", "State-gov"][j % 2].into()),
                    ),
                ]
            })
            .collect(),
        ..ScoreRequest::default()
    }
}

fn models() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

#[test]
fn concurrent_calls_get_their_own_answers() {
    let d = start_daemon(&models(), None, &[]);
    let mut blocking = Connection::connect(d.addr).unwrap();
    let want: Vec<Vec<f32>> = (0..64)
        .map(|i| blocking.score(&request(i)).unwrap().scores)
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = Arc::new(AsyncConnection::connect(d.addr).await.unwrap());
        conn.ping().await.unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let c = conn.clone();
                tokio::spawn(async move { (i, c.score(&request(i)).await) })
            })
            .collect();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(r.unwrap().scores, want[i], "request {i}");
        }
        let mut bad = request(0);
        bad.model = "nope".into();
        match conn.score(&bad).await {
            Err(ClientError::Server {
                code: Some(ErrorCode::UnknownModel),
                message,
                ..
            }) => {
                assert!(message.contains("nope"))
            }
            other => panic!("{other:?}"),
        }
        let pool = AsyncPool::new(&[d.addr], 3);
        for (i, w) in want.iter().enumerate().take(12) {
            assert_eq!(&pool.score(&request(i)).await.unwrap().scores, w);
        }
    });
}

#[test]
fn the_pool_reconnects_after_a_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let d = start_daemon(&models(), None, &["--listen", &listen]);
    let addr = d.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = AsyncPool::new(&[addr], 2);
    rt.block_on(async {
        assert!(pool.score(&request(1)).await.is_ok());
    });
    drop(d);
    rt.block_on(async {
        // Down: calls fail fast with an error, never hang.
        for _ in 0..4 {
            let r =
                tokio::time::timeout(std::time::Duration::from_secs(5), pool.score(&request(1)))
                    .await
                    .expect("a call to a dead server returns");
            assert!(r.is_err());
        }
    });
    let _d2 = start_daemon(&models(), None, &["--listen", &listen]);
    rt.block_on(async {
        let start = std::time::Instant::now();
        loop {
            if pool.score(&request(2)).await.is_ok() {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "never reconnected"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
}
