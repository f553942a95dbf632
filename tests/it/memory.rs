//! Memory is bounded by configuration, not by input size: ten times the records, the same peak.
//! (Small sink buffers, so both runs fill them: the bound is what is being checked.)

use crate::common::sluice;

/// Runs generator → SQL → partitioned Parquet over `count` records and returns the peak RSS the
/// run summary reports, in bytes.
fn peak_rss(count: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            r#"[pipeline]
name = "mem"
memory_budget = "32MiB"

[sources.orders]
type = "generator"
shape = "orders"
count = {count}

[transforms.t]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, customer_id, amount, country, ts FROM orders WHERE status <> 'cancelled'"

[sinks.lake]
type = "file"
inputs = ["t"]
path = "{}"
partition_by = ["country"]
row_group_bytes = "4MiB"
buffer_bytes = "8MiB"
"#,
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let out = sluice().args(["run", "--no-progress"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    crate::common::peak_rss_mib(&stderr) * 1048576.0
}

#[test]
fn peak_memory_does_not_grow_with_input_size() {
    let small = peak_rss(200_000);
    let large = peak_rss(2_000_000);
    eprintln!("peak RSS: 200k records {:.1} MiB, 2M records {:.1} MiB", small / 1048576.0, large / 1048576.0);
    assert!(large < small * 1.5 + 16.0 * 1048576.0, "peak RSS grew with input: {small} → {large}");
    assert!(large < 400.0 * 1048576.0, "peak RSS {large} is far above the configured budgets");
}

/// README's setting for a flat RSS (section Memory, "Freed memory"), kept in step with it here.
const FLAT_MALLOC_CONF: &str = "narenas:1,hpa:true,hpa_slab_max_alloc:2097152,hpa_dirty_mult:0.1";

/// The README's flat-memory recipe works: sluice under jemalloc (LD_PRELOAD) with those options
/// runs generator → Parquet to the end with every record written, and it was jemalloc, with
/// those options, that served it (its statistics, printed at exit, say so). sluice's own glibc
/// tuning (mallopt, the trim thread) must not get in its way.
#[test]
fn the_readme_jemalloc_recipe_runs_a_pipeline() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains(&format!("`MALLOC_CONF={FLAT_MALLOC_CONF}`")), "README no longer gives {FLAT_MALLOC_CONF}");
    let lib = std::env::var("SLUICE_TEST_JEMALLOC")
        .expect("SLUICE_TEST_JEMALLOC is not set: run the tests with scripts/test.sh, which installs libjemalloc2");
    // README gives Debian's x86_64 path; elsewhere the library has the same name.
    let name = std::path::Path::new(&lib).file_name().unwrap().to_string_lossy().to_string();
    assert!(
        readme.contains(&format!("`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/{name}`")),
        "README names another library than {name}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let out_dir = dir.path().join("out");
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nname = \"flat\"\n\n[sources.orders]\ntype = \"generator\"\nshape = \"orders\"\ncount = 300000\n\n\
             [sinks.lake]\ntype = \"file\"\ninputs = [\"orders\"]\npath = \"{}\"\nformat = \"parquet\"\n",
            out_dir.display()
        ),
    )
    .unwrap();
    let out = sluice()
        .args(["run", "--no-progress"])
        .arg(&path)
        .env("LD_PRELOAD", &lib)
        .env("MALLOC_CONF", format!("{FLAT_MALLOC_CONF},stats_print:true"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for opt in ["opt.narenas: 1", "opt.hpa: true", "opt.hpa_slab_max_alloc: 2097152", "opt.hpa_dirty_mult: \"0.09"] {
        assert!(stderr.contains(opt), "jemalloc's statistics lack `{opt}`:\n{stderr}");
    }
    assert_eq!(crate::common::rows(&crate::common::read_parquet(&out_dir)), 300_000);
}

/// Peak RSS (bytes, from the run summary) of generator → blackhole over `count` records in
/// batches of 2 with the metrics endpoint on and nobody scraping it.
fn peak_rss_unscraped(count: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nname = \"unscraped\"\nbatch_size = 2\n\n[sources.orders]\ntype = \"generator\"\n\
             shape = \"orders\"\ncount = {count}\n\n[sinks.nowhere]\ntype = \"blackhole\"\ninputs = [\"orders\"]\n"
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", crate::common::free_port());
    let out = sluice().args(["run", "--no-progress", "--metrics-addr", &addr]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    crate::common::peak_rss_mib(&stderr) * 1048576.0
}

/// The Prometheus recorder keeps every histogram sample (one per batch and component) until it
/// is rendered or upkept; sluice upkeeps it, so a process nobody scrapes does not grow with the
/// batches it moves. Without the upkeep task the larger run peaked about 10 MiB higher (debug
/// build: 38 → 48 MiB for 100,000 → 400,000 batches).
#[test]
fn unscraped_metrics_do_not_grow_with_the_batches() {
    let small = peak_rss_unscraped(200_000);
    let large = peak_rss_unscraped(800_000);
    eprintln!(
        "peak RSS, metrics unscraped: 100k batches {:.1} MiB, 400k batches {:.1} MiB",
        small / 1048576.0,
        large / 1048576.0
    );
    assert!(large < small + 4.0 * 1048576.0, "peak RSS grew with the batches: {small} → {large}");
}
