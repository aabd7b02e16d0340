//! `rankd-tool deploy`: puts a model file into a model root so that a running `rankd` picks it up
//! atomically. The file is validated, copied into a hidden directory on the same file system,
//! synced, and the directory is renamed to `ROOT/<name>/<version>`: the daemon never sees a
//! half-copied model.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rankd_formats::ModelFile;

/// Where and when a model was deployed.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The version directory.
    pub dir: PathBuf,
    /// When the rename happened, milliseconds since the Unix epoch.
    pub renamed_at_ms: u128,
}

/// Deploys `file` under `root`. Name and version default to the file's metadata. Returns where
/// it landed and when it was renamed into place.
pub fn deploy(
    file: &Path,
    root: &Path,
    name: Option<&str>,
    version: Option<u64>,
) -> Result<Deployed> {
    let model = ModelFile::open(file)
        .with_context(|| format!("{} is not a valid model", file.display()))?;
    let name = name.unwrap_or(&model.spec().metadata.name).to_owned();
    let version = version.unwrap_or(model.spec().metadata.version);
    drop(model);
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        bail!("invalid model name {name:?}");
    }
    let model_dir = root.join(&name);
    std::fs::create_dir_all(&model_dir)
        .with_context(|| format!("cannot create {}", model_dir.display()))?;
    let target = model_dir.join(version.to_string());
    if target.exists() {
        bail!(
            "{} already exists; versions are immutable, deploy a new one",
            target.display()
        );
    }
    let tmp = model_dir.join(format!(".deploy-{version}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut renamed_at_ms = 0;
    let result = (|| -> Result<()> {
        let dst = tmp.join("model.rkm");
        std::fs::copy(file, &dst).with_context(|| format!("cannot copy to {}", dst.display()))?;
        File::open(&dst)?.sync_all()?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))?;
        renamed_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        File::open(&model_dir)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(Deployed {
        dir: target,
        renamed_at_ms,
    })
}
