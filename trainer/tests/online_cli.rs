//! `rankd-train online` as a process, against a real Kafka broker: flags over the config file,
//! a last delta, the export and the exit line after `--max-samples`; a config without
//! `[online]` fails with a message saying so.

use std::process::Command;
use std::time::Duration;

use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_storage::kafka::{testing, Topic};

#[test]
fn the_online_subcommand_trains_publishes_and_exports() {
    let Some(broker) = testing::broker() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.rkm");
    write_synthetic(
        &base,
        &SynthOptions {
            kind: ModelKind::WideDeep,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    let samples_url = broker.url(&testing::Broker::unique_topic("cli-samples"));
    let updates_url = broker.url(&testing::Broker::unique_topic("cli-updates"));
    let timeout = Duration::from_secs(20);
    let samples = Topic::connect(&samples_url.parse().unwrap(), true, timeout).unwrap();
    let n = 300u64;
    let values = (0..n)
        .map(|i| {
            // One in ten is a CSV line, which needs [online] columns: skipped and counted.
            if i % 10 == 9 {
                return b"oops,1".to_vec();
            }
            format!(
                r#"{{"user_age": {}, "user_city": "c{}", "hour": {}, "item_id": {}, "item_tags": ["t{}"], "item_price": 2.0, "label": {}}}"#,
                20 + i % 30,
                i % 4,
                i % 24,
                i % 100,
                i % 5,
                u8::from(i % 3 == 0)
            )
            .into_bytes()
        })
        .collect();
    samples.produce(None, values).unwrap();
    let config = dir.path().join("online.toml");
    std::fs::write(
        &config,
        format!(
            "[train]\ntrain_files = []\nbatch_size = 16\n\n[online]\nsamples = \"{samples_url}\"\nupdates = \"kafka://127.0.0.1:9/overridden\"\n"
        ),
    )
    .unwrap();
    let export = dir.path().join("trained.rkm");
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-train"))
        .args(["online", "--config"])
        .arg(&config)
        .arg("--base")
        .arg(&base)
        .args(["--updates", &updates_url, "--publish-interval-ms", "50"])
        .args(["--max-samples", &n.to_string()])
        .arg("--export")
        .arg(&export)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(", 30 skipped;"), "{stdout}");
    assert!(stderr.contains("skipped:"), "{stderr}");
    rankd_formats::ModelFile::open(&export).unwrap();
    let updates = Topic::connect(&updates_url.parse().unwrap(), false, timeout).unwrap();
    let (first, next) = updates.offsets().unwrap();
    assert!(next > first, "no delta was published: {stderr}");

    // No [online] table.
    std::fs::write(&config, "[train]\ntrain_files = []\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-train"))
        .args(["online", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no [online] table"), "{stderr}");
}
