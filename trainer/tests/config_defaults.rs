//! The defaults table of docs/trainer.md against the code: every row's value, written out in a
//! config, gives exactly the settings of a config that leaves it out. Plus the rules on the
//! validation and test sets.

use std::path::Path;

use rankd_trainer::TrainConfig;

const MODEL: &str = r#"
[[feature]]
name = "x"
type = "float"

[[slot]]
name = "x_b"
transform = "piecewise"
input = "x"
boundaries = [0.0, 1.0]

[[embedding]]
slot = "x_b"
dim = 2

[wide]
slots = ["x_b"]
"#;

fn parse(train: &str) -> Result<TrainConfig, String> {
    let text = format!("{MODEL}\n[train]\ntrain_files = [\"train.csv\"]\n{train}");
    TrainConfig::from_toml(&text, Path::new("/nonexistent")).map_err(|e| e.to_string())
}

fn doc_defaults() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/trainer.md"))
            .unwrap();
    let start = doc
        .find("| setting | default | meaning |")
        .expect("the defaults table");
    doc[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let key = cells[0]
                .trim_start_matches("| ")
                .trim_matches('`')
                .to_owned();
            let value = cells[1].trim_matches('`').replace("\\|", "|");
            (key, value)
        })
        .collect()
}

#[test]
fn every_documented_default_is_the_code_default() {
    let minimal = format!("{:?}", parse("").unwrap().train);
    let rows = doc_defaults();
    assert!(rows.len() >= 25, "only {} rows in the table", rows.len());
    let mut checked = 0;
    for (key, value) in &rows {
        // Rows without a value to write: required, absent, or derived from another setting.
        if value.starts_with('(') || value == "none" || value.starts_with('<') {
            continue;
        }
        let explicit = match key.as_str() {
            "fit" => String::new(),
            _ => format!("{key} = {value}\n"),
        };
        let with = parse(&explicit).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        assert_eq!(
            format!("{:?}", with.train),
            minimal,
            "docs/trainer.md says `{key}` defaults to {value}, the code disagrees"
        );
        checked += 1;
    }
    assert!(checked >= 22, "{checked} rows checked");
}

#[test]
fn checkpoints_are_on_by_default() {
    assert_eq!(parse("").unwrap().train.checkpoint_every, 1);
}

#[test]
fn validation_and_test_sets() {
    let c = parse("valid_files = [\"v.csv\"]\ntest_files = [\"t.csv\"]\n").unwrap();
    assert_eq!(c.train.eval_files, vec![Path::new("/nonexistent/v.csv")]);
    assert_eq!(c.train.test_files, vec![Path::new("/nonexistent/t.csv")]);
    // The older name still works.
    let old = parse("eval_files = [\"v.csv\"]\n").unwrap();
    assert_eq!(old.train.eval_files, c.train.eval_files);
    for bad in [
        "valid_files = [\"v.csv\"]\neval_files = [\"v.csv\"]\n",
        "valid_split = 0.1\neval_split = 0.1\n",
        "valid_split = 0.1\nvalid_files = [\"v.csv\"]\n",
        "valid_split = 1.5\n",
        "early_stopping_metric = \"accuracy\"\n",
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad}");
    }
    let c = parse("early_stopping_metric = \"logloss\"\n").unwrap();
    assert_eq!(
        c.train.early_stopping_metric,
        rankd_trainer::config::StopMetric::Logloss
    );
}

/// The block of a YAML literal `key: |` in `yaml`, dedented.
fn yaml_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines.next().expect("the key is in the manifest");
    let indent = head.len() - head.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_training_job_config_is_a_valid_training_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let yaml = std::fs::read_to_string(root.join("deploy/kubernetes/train-tfjob.yaml")).unwrap();
    let text = yaml_block(&yaml, "train.toml");
    // Its data files, on a stand-in for the shared volume.
    let dir = tempfile::tempdir().unwrap();
    for d in ["data", "valid"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
        std::fs::write(
            dir.path().join(d).join("part-0.csv"),
            "user_id,item_id,hour,click\nu1,i1,3,1\n",
        )
        .unwrap();
    }
    let text = text.replace("/train/", &format!("{}/", dir.path().display()));
    let c = TrainConfig::from_toml(&text, dir.path()).unwrap();
    assert_eq!(c.train.train_files.len(), 1);
    assert_eq!(c.train.eval_files.len(), 1);
    let spec = rankd_feature_ops::CompiledSpec::compile(&c.model.feature_spec()).unwrap();
    let layout = rankd_trainer::model::Layout::new(&c.model, &spec).unwrap();
    assert_eq!(layout.emb.len(), 3);
}
