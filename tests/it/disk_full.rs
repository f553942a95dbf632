//! A full disk under the file sink and the dead-letter path: the run stops with an error naming
//! the file and the cause, only complete files are left, and every committed offset is in them.
//!
//! The small disk is a 512 KiB tmpfs mounted in a mount namespace of the sluice process alone
//! (`unshare --mount --map-root-user`), so the test needs no root and leaves no mount behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;

use crate::common::{files, read_ndjson, read_parquet};
use crate::kafka::{create, offsets, produce, run_bounded, topic};

fn pipeline(t: &str, group: &str, out: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "disk-full"
batch_size = 1000

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{t}"]
group_id = "{group}"
format = {{ type = "json" }}
metadata = ["partition", "offset"]
schema = {{ order_id = "bigint not null", customer = "varchar", amount = "decimal(10,2) not null", status = "varchar" }}

[sinks.lake]
type = "file"
inputs = ["orders"]
path = "{out}/lake"
rotate = {{ max_rows = 4000 }}

[dead_letter]
type = "file"
path = "{out}/dead"
"#,
        brokers = crate::kafka::brokers(),
        out = out.display()
    )
}

/// partition → offsets found in the output under `dir` (rows and dead letters).
fn offsets_in(dir: &Path) -> BTreeMap<i64, BTreeSet<i64>> {
    let mut seen: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for (_, b) in read_parquet(&dir.join("lake")) {
        let p = b.column_by_name("_partition").unwrap().as_primitive::<arrow::datatypes::Int32Type>().clone();
        let o = b.column_by_name("_offset").unwrap().as_primitive::<Int64Type>().clone();
        for i in 0..b.num_rows() {
            seen.entry(i64::from(p.value(i))).or_default().insert(o.value(i));
        }
    }
    for d in read_ndjson(&dir.join("dead")) {
        let pos = &d["position"];
        seen.entry(pos["partition"].as_i64().unwrap()).or_default().insert(pos["offset"].as_i64().unwrap());
    }
    seen
}

#[test]
fn a_full_disk_stops_the_run_with_a_clear_error_leaves_complete_files_and_loses_no_offset() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("diskfull");
    create(&t, 2);
    let m = produce(&t, 2, 40_000, 1, 50, dir.path());
    let group = format!("{t}-g");
    let (full, saved) = (dir.path().join("full"), dir.path().join("saved"));
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&saved).unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, pipeline(&t, &group, &full)).unwrap();
    // In the namespace: mount the small disk, run, keep the exit code and a copy of what is there.
    let script = format!(
        "mount -t tmpfs -o size=512k sluice-full '{full}' && {{ '{bin}' run --bounded --no-progress '{p}'; \
         echo $? > '{saved}/exit'; cp -a '{full}/.' '{saved}/'; }}",
        full = full.display(),
        bin = env!("CARGO_BIN_EXE_sluice"),
        p = p.display(),
        saved = saved.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c", &script])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let exit = std::fs::read_to_string(saved.join("exit")).unwrap_or_else(|_| panic!("the run did not start: {err}"));
    assert_eq!(exit.trim(), "3", "a runtime failure: {err}");
    assert!(err.contains("No space left on device") && err.contains(&full.display().to_string()), "{err}");

    // Only complete files: nothing half-written under a final name, no temporary file left.
    let left: Vec<_> =
        files(&saved, "").into_iter().filter(|f| f.file_name().unwrap().to_string_lossy().starts_with('.')).collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
    let complete = files(&saved.join("lake"), ".parquet");
    assert!(!complete.is_empty(), "some files completed before the disk filled: {err}");
    let first = offsets_in(&saved);

    // Every offset the run committed is in what it left.
    let committed = offsets(&t, &group);
    for (partition, (c, _)) in &committed {
        let seen = first.get(&i64::from(*partition)).cloned().unwrap_or_default();
        for o in 0..(*c).max(0) {
            assert!(seen.contains(&o), "partition {partition}: offset {o} committed but not written (committed {c})");
        }
    }

    // With room again, a rerun resumes from the commits: together, every record is there.
    let rerun = dir.path().join("rerun");
    std::fs::write(&p, pipeline(&t, &group, &rerun)).unwrap();
    run_bounded(&p);
    let mut all = first;
    for (partition, o) in offsets_in(&rerun) {
        all.entry(partition).or_default().extend(o);
    }
    for (partition, (_, end)) in &committed {
        let seen = all.get(&i64::from(*partition)).map_or(0, BTreeSet::len);
        assert_eq!(seen as i64, *end, "partition {partition}: every offset written or dead-lettered");
    }
    assert_eq!(all.values().map(BTreeSet::len).sum::<usize>(), m.good.len() + m.bad.len());
}
