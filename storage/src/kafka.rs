//! A blocking Kafka topic client for the online-learning path: the trainer reads samples and
//! writes deltas, every daemon replica reads deltas. Built on rskafka (pure Rust: no librdkafka
//! to build, no system packages) on a small tokio runtime owned by the client, with a deadline on
//! every call (rskafka retries forever unless told otherwise).
//!
//! rankd needs no consumer groups: every replica must read every delta, so each reads the
//! partition itself from an offset it keeps (its own catch-up position), which is what a plain
//! partition client does. Topics rankd uses have one partition: deltas are ordered.

use std::time::Duration;

use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use rskafka::record::Record;

use crate::{Result, StorageError};

/// A parsed `kafka://host:port[,host:port...]/topic` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaUrl {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// The topic.
    pub topic: String,
}

impl std::fmt::Display for KafkaUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kafka://{}/{}", self.brokers.join(","), self.topic)
    }
}

impl std::str::FromStr for KafkaUrl {
    type Err = StorageError;

    fn from_str(url: &str) -> Result<KafkaUrl> {
        let bad = |reason: &str| StorageError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| bad("not a kafka:// URL"))?;
        let (hosts, topic) = rest
            .split_once('/')
            .ok_or_else(|| bad("no topic (kafka://host:port/topic)"))?;
        // Kafka's own rule for topic names.
        if topic.is_empty()
            || topic.len() > 249
            || topic == "."
            || topic == ".."
            || !topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return Err(bad(
                "a topic is 1 to 249 characters of [a-zA-Z0-9._-], not `.` or `..`",
            ));
        }
        let brokers: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for b in &brokers {
            let port = b.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0) {
                return Err(bad(&format!("broker `{b}` is not host:port")));
            }
        }
        Ok(KafkaUrl {
            brokers,
            topic: topic.to_owned(),
        })
    }
}

/// A message read from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its offset in the partition.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// The value (empty for a null value).
    pub value: Vec<u8>,
    /// Its timestamp (the producer's create time unless the topic says log-append time), Unix
    /// milliseconds.
    pub timestamp_ms: i64,
}

/// Partition 0 of one topic, blocking, every call under a deadline.
pub struct Topic {
    runtime: tokio::runtime::Runtime,
    partition: PartitionClient,
    url: KafkaUrl,
    timeout: Duration,
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn kafka_err(op: &'static str, url: &KafkaUrl, e: impl std::fmt::Display) -> StorageError {
    StorageError::Kafka {
        op,
        topic: url.to_string(),
        message: e.to_string(),
    }
}

/// The largest fetch answer asked for (a delta part is far smaller; samples come in many).
const FETCH_MAX_BYTES: i32 = 16 << 20;

impl Topic {
    /// Connects to the brokers of `url` and opens partition 0 of its topic, creating the topic
    /// (one partition, replication factor 1 or the broker's default) when `create` is set and it
    /// does not exist. Fails within about `timeout` when no broker answers.
    pub fn connect(url: &KafkaUrl, create: bool, timeout: Duration) -> Result<Topic> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::Local {
                path: "tokio runtime".into(),
                source: e,
            })?;
        let backoff = rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(1000),
            base: 2.0,
            deadline: Some(timeout),
        };
        let partition = runtime.block_on(async {
            let client = deadline(
                timeout,
                "connect",
                url,
                ClientBuilder::new(url.brokers.clone())
                    .client_id("rankd")
                    .backoff_config(backoff)
                    .build(),
            )
            .await?;
            if create {
                let controller = client
                    .controller_client()
                    .map_err(|e| kafka_err("create topic", url, e))?;
                let made = deadline(
                    timeout,
                    "create topic",
                    url,
                    controller.create_topic(url.topic.clone(), 1, 1, timeout.as_millis() as i32),
                )
                .await;
                match made {
                    Ok(()) => {}
                    Err(StorageError::Kafka { message, .. })
                        if message.contains("TopicAlreadyExists") => {}
                    Err(e) => return Err(e),
                }
            }
            deadline(
                timeout,
                "open partition",
                url,
                client.partition_client(url.topic.clone(), 0, UnknownTopicHandling::Retry),
            )
            .await
        })?;
        Ok(Topic {
            runtime,
            partition,
            url: url.clone(),
            timeout,
        })
    }

    /// The topic's URL.
    pub fn url(&self) -> &KafkaUrl {
        &self.url
    }

    /// Appends `values` (with `key`) in one produce request; returns their offsets.
    pub fn produce(&self, key: Option<&[u8]>, values: Vec<Vec<u8>>) -> Result<Vec<i64>> {
        let now = rskafka::chrono::Utc::now();
        let records = values
            .into_iter()
            .map(|v| Record {
                key: key.map(<[u8]>::to_vec),
                value: Some(v),
                headers: Default::default(),
                timestamp: now,
            })
            .collect();
        self.block(
            "produce",
            self.partition.produce(records, Compression::NoCompression),
        )
    }

    /// Messages from `offset` on, waiting up to `max_wait` for the first; and the partition's
    /// high watermark (the offset the next message will get).
    pub fn fetch(&self, offset: i64, max_wait: Duration) -> Result<(Vec<Message>, i64)> {
        let wait_ms = max_wait.as_millis().min(i32::MAX as u128) as i32;
        let (records, high) = self.block_for(
            "fetch",
            self.timeout + max_wait,
            self.partition
                .fetch_records(offset, 1..FETCH_MAX_BYTES, wait_ms),
        )?;
        let messages = records
            .into_iter()
            // A fetch may start before `offset` (a batch is returned whole).
            .filter(|r| r.offset >= offset)
            .map(|r| Message {
                offset: r.offset,
                key: r.record.key,
                value: r.record.value.unwrap_or_default(),
                timestamp_ms: r.record.timestamp.timestamp_millis(),
            })
            .collect();
        Ok((messages, high))
    }

    /// The first offset still held (retention) and the next offset to be written.
    pub fn offsets(&self) -> Result<(i64, i64)> {
        let first = self.block(
            "list offsets",
            self.partition.get_offset(OffsetAt::Earliest),
        )?;
        let next = self.block("list offsets", self.partition.get_offset(OffsetAt::Latest))?;
        Ok((first, next))
    }

    fn block<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = std::result::Result<T, rskafka::client::error::Error>>,
    ) -> Result<T> {
        self.block_for(op, self.timeout, f)
    }

    fn block_for<T>(
        &self,
        op: &'static str,
        limit: Duration,
        f: impl std::future::Future<Output = std::result::Result<T, rskafka::client::error::Error>>,
    ) -> Result<T> {
        self.runtime.block_on(deadline(limit, op, &self.url, f))
    }
}

async fn deadline<T, E: std::fmt::Display>(
    limit: Duration,
    op: &'static str,
    url: &KafkaUrl,
    f: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(kafka_err(op, url, e)),
        Err(_) => Err(StorageError::Kafka {
            op,
            topic: url.to_string(),
            message: format!("no answer within {} ms", limit.as_millis()),
        }),
    }
}

pub mod testing {
    //! A real Kafka broker for tests: the one `.ci/run` started (`RANKD_KAFKA_URL`), or one
    //! started here through `scripts/kafka.sh` for this test process. Outside CI, tests skip
    //! with a printed reason when Java or Maven is missing; in CI (`CI=true`) that is a failure.

    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A running single broker.
    #[derive(Debug)]
    pub struct Broker {
        /// `host:port`.
        pub address: String,
        dir: Option<PathBuf>,
    }

    /// The repository's `scripts/kafka.sh`.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh")
    }

    fn skip_or_fail(reason: &str) -> Option<Broker> {
        crate::testing::skip_or_fail_in_ci("Kafka", reason)
    }

    /// The shared broker of `RANKD_KAFKA_URL`, else a private one (stopped on drop).
    pub fn broker() -> Option<Broker> {
        if let Ok(url) = std::env::var("RANKD_KAFKA_URL") {
            return Some(Broker {
                address: url.trim_start_matches("kafka://").to_owned(),
                dir: None,
            });
        }
        private_broker()
    }

    /// A broker of this test's own (stopped on drop), for tests that pause or stop it.
    pub fn private_broker() -> Option<Broker> {
        if !crate::testing::tools_present() {
            return skip_or_fail("java and mvn are needed to run a Kafka broker");
        }
        let dir = std::env::temp_dir().join(format!(
            "rankd-kafka-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .args(["--owner", &std::process::id().to_string()])
            .output()
            .expect("run scripts/kafka.sh");
        if !out.status.success() {
            return skip_or_fail(&format!(
                "scripts/kafka.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Some(Broker {
            address: url.trim_start_matches("kafka://").to_owned(),
            dir: Some(dir),
        })
    }

    impl Broker {
        /// The broker JVM's process id, for a private broker.
        pub fn pid(&self) -> Option<i32> {
            std::fs::read_to_string(self.dir.as_ref()?.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        }

        /// `kafka://ADDRESS/TOPIC`.
        pub fn url(&self, topic: &str) -> String {
            format!("kafka://{}/{topic}", self.address)
        }

        /// A topic name unique to this process and call.
        pub fn unique_topic(prefix: &str) -> String {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            format!(
                "{prefix}-{}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis()),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        }
    }

    impl Drop for Broker {
        fn drop(&mut self) {
            if let Some(dir) = &self.dir {
                let _ = Command::new(script()).arg("stop").arg(dir).output();
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        let u: KafkaUrl = "kafka://a:9092,b:9093/feed.updates".parse().unwrap();
        assert_eq!(u.brokers, ["a:9092", "b:9093"]);
        assert_eq!(u.topic, "feed.updates");
        assert_eq!(u.to_string(), "kafka://a:9092,b:9093/feed.updates");
        for bad in [
            "hdfs://a:1/t",
            "kafka://a:1",
            "kafka://a:1/",
            "kafka://a/t",
            "kafka://a:0/t",
            "kafka://:9/t",
            "kafka://a:1/t/x",
            "kafka://a:1/..",
        ] {
            assert!(bad.parse::<KafkaUrl>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn produce_and_fetch_on_a_real_broker() {
        let Some(broker) = testing::broker() else {
            return;
        };
        let url: KafkaUrl = broker
            .url(&testing::Broker::unique_topic("storage-test"))
            .parse()
            .unwrap();
        let topic = Topic::connect(&url, true, Duration::from_secs(20)).unwrap();
        let values: Vec<Vec<u8>> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
        let offsets = topic.produce(Some(b"k"), values.clone()).unwrap();
        assert_eq!(offsets, [0, 1, 2, 3, 4]);
        let (first, next) = topic.offsets().unwrap();
        assert_eq!((first, next), (0, 5));
        let (got, high) = topic.fetch(2, Duration::from_millis(100)).unwrap();
        assert_eq!(high, 5);
        assert_eq!(
            got.iter().map(|m| m.value.clone()).collect::<Vec<_>>(),
            values[2..]
        );
        assert_eq!(got[0].key.as_deref(), Some(&b"k"[..]));
        // Nothing new: the fetch waits and comes back empty.
        let t = std::time::Instant::now();
        let (none, _) = topic.fetch(5, Duration::from_millis(300)).unwrap();
        assert!(none.is_empty());
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // A second client sees the same topic (it exists now).
        let again = Topic::connect(&url, true, Duration::from_secs(20)).unwrap();
        assert_eq!(again.fetch(0, Duration::ZERO).unwrap().0.len(), 5);

        // No broker: a timely error, not a hang.
        let dead: KafkaUrl = "kafka://127.0.0.1:9/x".parse().unwrap();
        let t = std::time::Instant::now();
        assert!(Topic::connect(&dead, false, Duration::from_millis(500)).is_err());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
