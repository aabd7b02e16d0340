//! The cluster of a multi-process training job, described as Kubernetes training operators
//! describe a parameter-server job: a `TF_CONFIG` JSON document.
//!
//! ```json
//! {"cluster": {"chief": ["host0:2222"], "ps": ["ps0:2222", "ps1:2222"],
//!              "worker": ["w0:2222", "w1:2222"]},
//!  "task": {"type": "worker", "index": 0}}
//! ```
//!
//! Kubeflow's training operator sets exactly this in every pod of a TFJob (from the
//! `environment variable TF_CONFIG`); `rankd-train --processes K` writes the same document for
//! the processes it starts, and `--cluster FILE` reads it from a file. Task types: `ps` (a
//! parameter server shard; shard `index` of `len(ps)`), `worker`, and `chief` (a worker that also
//! coordinates: fitting, evaluation, checkpoints and the model file). Without a `chief` entry,
//! worker 0 is the chief, as in TensorFlow. Worker numbering: the chief first, then the workers
//! in order. `evaluator` tasks are not used by rankd and exit at once.

use serde::Deserialize;

use crate::error::{Result, TrainError};

/// A task's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Parameter server shard `i`.
    Ps(usize),
    /// Worker `i` (worker 0 is the chief).
    Worker(usize),
    /// A task type rankd has no use for (`evaluator`): the process exits successfully.
    Idle,
}

/// A parsed `TF_CONFIG`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Parameter server addresses (`host:port`), by shard.
    pub ps: Vec<String>,
    /// Worker addresses, by worker index (the chief first).
    pub workers: Vec<String>,
    /// This process's role.
    pub role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TfConfig {
    cluster: Spec,
    task: Task,
    /// Written by some launchers (`"cloud"`, `"google"`); ignored.
    #[serde(default)]
    #[allow(dead_code)]
    environment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    chief: Vec<String>,
    #[serde(default)]
    master: Vec<String>,
    #[serde(default)]
    ps: Vec<String>,
    #[serde(default)]
    worker: Vec<String>,
    #[serde(default)]
    evaluator: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Task {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    index: usize,
    /// Set by some launchers; ignored.
    #[serde(default)]
    #[allow(dead_code)]
    trial: Option<String>,
}

impl Cluster {
    /// Parses a `TF_CONFIG` document.
    pub fn parse(text: &str) -> Result<Cluster> {
        let bad = |m: String| TrainError::Config(format!("TF_CONFIG: {m}"));
        let c: TfConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let spec = c.cluster;
        let chiefs: Vec<String> = spec.chief.into_iter().chain(spec.master).collect();
        if chiefs.len() > 1 {
            return Err(bad(format!("{} chiefs; at most one", chiefs.len())));
        }
        let n_chief = chiefs.len();
        let workers: Vec<String> = chiefs.into_iter().chain(spec.worker).collect();
        if spec.ps.is_empty() {
            return Err(bad("no `ps` tasks: rankd needs at least one".into()));
        }
        if workers.is_empty() {
            return Err(bad("no `chief` or `worker` tasks".into()));
        }
        let i = c.task.index;
        let role = match c.task.kind.as_str() {
            "ps" if i < spec.ps.len() => Role::Ps(i),
            "chief" | "master" if i == 0 && n_chief == 1 => Role::Worker(0),
            "worker" if i + n_chief < workers.len() => Role::Worker(i + n_chief),
            "evaluator" if i < spec.evaluator.len() => Role::Idle,
            kind => return Err(bad(format!("task {kind} {i} is not in the cluster"))),
        };
        for a in spec.ps.iter().chain(&workers) {
            if !a.contains(':') {
                return Err(bad(format!("address {a:?} has no port")));
            }
        }
        Ok(Cluster {
            ps: spec.ps,
            workers,
            role,
        })
    }

    /// The document of `ps` shards and `workers` with this process as `role`, as
    /// `rankd-train --processes` writes it for its children (no chief entry: worker 0 is it).
    pub fn to_tf_config(&self) -> String {
        let (kind, index) = match self.role {
            Role::Ps(i) => ("ps", i),
            Role::Worker(i) => ("worker", i),
            Role::Idle => ("evaluator", 0),
        };
        serde_json::json!({
            "cluster": {"ps": self.ps, "worker": self.workers},
            "task": {"type": kind, "index": index},
        })
        .to_string()
    }

    /// The port this task listens on: the port of its own address (a parameter server binds all
    /// interfaces on it, as a pod's address is its service name).
    pub fn own_port(&self) -> Option<u16> {
        let addr = match self.role {
            Role::Ps(i) => &self.ps[i],
            Role::Worker(i) => &self.workers[i],
            Role::Idle => return None,
        };
        addr.rsplit(':').next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tfjob_document_with_and_without_a_chief() {
        let c = Cluster::parse(
            r#"{"cluster":{"chief":["c:1"],"ps":["p0:2","p1:2"],"worker":["w0:3","w1:3"]},
                "task":{"type":"worker","index":1},"environment":"cloud"}"#,
        )
        .unwrap();
        assert_eq!(c.workers, ["c:1", "w0:3", "w1:3"]);
        assert_eq!(c.role, Role::Worker(2));
        assert_eq!(c.own_port(), Some(3));
        let c = Cluster::parse(
            r#"{"cluster":{"ps":["p0:2","p1:7"],"worker":["w0:3"]},"task":{"type":"ps","index":1}}"#,
        )
        .unwrap();
        assert_eq!(c.role, Role::Ps(1));
        assert_eq!(c.own_port(), Some(7));
        let again = Cluster::parse(&c.to_tf_config()).unwrap();
        assert_eq!(again, c);
        let chief = Cluster::parse(
            r#"{"cluster":{"chief":["c:1"],"ps":["p:2"]},"task":{"type":"chief","index":0}}"#,
        )
        .unwrap();
        assert_eq!(chief.role, Role::Worker(0));
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        for (doc, why) in [
            (
                r#"{"cluster":{"worker":["w:1"]},"task":{"type":"worker"}}"#,
                "no `ps`",
            ),
            (
                r#"{"cluster":{"ps":["p:1"]},"task":{"type":"ps"}}"#,
                "no `chief`",
            ),
            (
                r#"{"cluster":{"ps":["p:1"],"worker":["w:1"]},"task":{"type":"worker","index":3}}"#,
                "worker 3 is not in the cluster",
            ),
            (
                r#"{"cluster":{"ps":["p"],"worker":["w:1"]},"task":{"type":"ps"}}"#,
                "has no port",
            ),
            (
                r#"{"cluster":{"ps":["p:1"],"workers":["w:1"]},"task":{"type":"ps"}}"#,
                "unknown field",
            ),
            ("not json", "TF_CONFIG"),
        ] {
            let e = Cluster::parse(doc).unwrap_err().to_string();
            assert!(e.contains(why), "{doc}: {e}");
        }
    }
}
