//! The HDFS client against a real HDFS (Hadoop's MiniDFSCluster, scripts/hdfs.sh), and
//! interoperability with Hadoop's own FsShell in both directions.

use std::io::Read;

use rankd_storage::testing::cluster;
use rankd_storage::{Hdfs, HdfsSettings, Location, StorageError};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn write_list_read_rename_and_interop_with_fsshell() {
    let Some(c) = cluster() else { return };
    let Location::Hdfs(base) = Location::parse(&c.unique_dir("storage")).unwrap() else {
        panic!("not hdfs")
    };
    let hdfs = Hdfs::for_path(&base, &HdfsSettings::default()).unwrap();
    // 5 MB crosses blocks of the test cluster's small minimum block size only if configured;
    // it crosses hdfs-native's packet and our read chunk sizes either way.
    let data = bytes(5 << 20 | 123, 7);
    let path = format!("{}/a/b/data.bin", base.path);
    assert_eq!(
        hdfs.upload(&mut data.as_slice(), &path, false).unwrap(),
        data.len() as u64
    );
    // No temporary name is left beside it; an existing target is refused.
    let names: Vec<String> = hdfs
        .list(&format!("{}/a/b", base.path))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["data.bin"]);
    assert!(matches!(
        hdfs.upload(&mut data.as_slice(), &path, false),
        Err(StorageError::Exists(_))
    ));
    let st = hdfs.stat(&path).unwrap().unwrap();
    assert_eq!(st.len, data.len() as u64);
    assert!(!st.is_dir);
    assert!(hdfs.stat(&format!("{path}.nope")).unwrap().is_none());

    // Whole download through a check that sees every byte in order.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("d.bin");
    let mut seen = Vec::new();
    hdfs.download(&path, &local, &mut |b| {
        seen.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, data);
    assert_eq!(std::fs::read(&local).unwrap(), data);
    // A check that refuses: no local file is left.
    let refused = dir.path().join("r.bin");
    let e = hdfs
        .download(&path, &refused, &mut |_| Err("no thanks".into()))
        .unwrap_err();
    assert!(e.to_string().contains("no thanks"), "{e}");
    assert!(!refused.exists());

    // Ranges through the streaming reader.
    for (off, len) in [(0u64, 10u64), (1 << 20, 3 << 20), (5 << 20, 1000)] {
        let mut r = hdfs.reader(&path, off, Some(len)).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let end = ((off + len) as usize).min(data.len());
        assert_eq!(got, data[off as usize..end], "range {off}+{len}");
    }

    // Globs.
    hdfs.upload(
        &mut &b"x"[..],
        &format!("{}/a/b/part-1.csv", base.path),
        false,
    )
    .unwrap();
    hdfs.upload(
        &mut &b"y"[..],
        &format!("{}/a/b/part-2.csv", base.path),
        false,
    )
    .unwrap();
    let parts: Vec<String> = hdfs
        .glob(&format!("{}/a/b/part-*.csv", base.path))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(parts, ["part-1.csv", "part-2.csv"]);

    // FsShell reads what rankd wrote...
    let got = dir.path().join("by-fsshell.bin");
    let (ok, _, err) = c.fs(&["-get", &format!("{}{path}", base.fs), got.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&got).unwrap(), data);
    // ... and rankd reads what FsShell wrote.
    let theirs = bytes(3 << 20 | 5, 9);
    let src = dir.path().join("theirs.bin");
    std::fs::write(&src, &theirs).unwrap();
    let target = format!("{}/from-fsshell.bin", base.path);
    let (ok, _, err) = c.fs(&[
        "-put",
        src.to_str().unwrap(),
        &format!("{}{target}", base.fs),
    ]);
    assert!(ok, "{err}");
    let back = dir.path().join("back.bin");
    hdfs.download(&target, &back, &mut |_| Ok(())).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), theirs);
    assert!(hdfs.delete(&base.path, true).unwrap());
}
