//! `rankd-train --processes W [--ps-shards K]`: a local producer of the cluster description. It
//! picks loopback ports, writes each process its `TF_CONFIG` (exactly what Kubeflow's training
//! operator writes into each pod of a TFJob), starts K shards and W workers running this same
//! binary with the same arguments, and waits. The first process that fails stops the others and
//! is named in the error; the shards end by themselves once every worker is done.

use std::ffi::OsString;
use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Role};
use crate::error::{Result, TrainError};

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| TrainError::Data(format!("no free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| TrainError::Data(format!("no free port: {e}")))
}

/// Starts `shards` parameter-server shards and `workers` workers, each `exe args` with its
/// `TF_CONFIG`, and waits for all of them.
pub fn launch(
    exe: &std::path::Path,
    args: &[OsString],
    workers: usize,
    shards: usize,
) -> Result<()> {
    let mut ps = Vec::new();
    for _ in 0..shards.max(1) {
        ps.push(format!("127.0.0.1:{}", free_port()?));
    }
    let mut ws = Vec::new();
    for _ in 0..workers.max(1) {
        ws.push(format!("127.0.0.1:{}", free_port()?));
    }
    let mut children: Vec<(String, Child)> = Vec::new();
    let start = |role: Role, name: String, children: &mut Vec<(String, Child)>| -> Result<()> {
        let cluster = Cluster {
            ps: ps.clone(),
            workers: ws.clone(),
            role,
        };
        let child = Command::new(exe)
            .args(args)
            .env("TF_CONFIG", cluster.to_tf_config())
            .spawn()
            .map_err(|e| TrainError::Data(format!("cannot start {name}: {e}")))?;
        eprintln!("rankd-train: started {name} (pid {})", child.id());
        children.push((name, child));
        Ok(())
    };
    let mut started = || -> Result<()> {
        for i in 0..ps.len() {
            start(Role::Ps(i), format!("ps {i}"), &mut children)?;
        }
        for i in 0..ws.len() {
            start(Role::Worker(i), format!("worker {i}"), &mut children)?;
        }
        Ok(())
    };
    let r = started();
    let stop_all = |children: &mut Vec<(String, Child)>| {
        for (_, c) in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    if let Err(e) = r {
        stop_all(&mut children);
        return Err(e);
    }
    let mut done = vec![false; children.len()];
    let mut workers_done_at: Option<Instant> = None;
    loop {
        for j in 0..children.len() {
            if done[j] {
                continue;
            }
            let status = children[j]
                .1
                .try_wait()
                .map_err(|e| TrainError::Data(format!("wait: {e}")))?;
            if let Some(status) = status {
                done[j] = true;
                if !status.success() {
                    let msg = format!(
                        "{} failed ({}); stopping the others",
                        children[j].0,
                        describe(status)
                    );
                    stop_all(&mut children);
                    return Err(TrainError::Data(msg));
                }
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(());
        }
        // The shards exit once every worker said it is done; one that does not is a bug to
        // report, not to wait for forever.
        if done[ps.len()..].iter().all(|&d| d) {
            let since = *workers_done_at.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(60) {
                let stuck: Vec<String> = children[..ps.len()]
                    .iter()
                    .zip(&done)
                    .filter(|(_, &d)| !d)
                    .map(|((n, _), _)| n.clone())
                    .collect();
                stop_all(&mut children);
                return Err(TrainError::Data(format!(
                    "{} did not exit after every worker finished",
                    stuck.join(", ")
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
