//! Helpers shared by the integration tests.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use sluice::runtime::{RunOptions, RunSummary};

/// Parses, builds and runs a pipeline given as text; `${OUT}` resolves to `out`.
pub async fn run_pipeline(toml: &str, out: &Path) -> sluice::Result<RunSummary> {
    let out = out.display().to_string();
    let loaded = sluice::config::load_str(Path::new("test.toml"), toml, |k| match k {
        "OUT" => Some(out.clone()),
        other => std::env::var(other).ok(),
    })?;
    let pipeline = sluice::runtime::build(&loaded).await?;
    pipeline.run(RunOptions::default()).await
}

/// Every file under `dir` (recursively) whose name ends with `suffix`, sorted.
pub fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads every Parquet file under `dir`.
pub fn read_parquet(dir: &Path) -> Vec<(PathBuf, RecordBatch)> {
    files(dir, ".parquet")
        .into_iter()
        .flat_map(|p| {
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
            reader.map(|b| b.unwrap()).map(move |b| (p.clone(), b)).collect::<Vec<_>>()
        })
        .collect()
}

/// Reads every NDJSON line under `dir` as JSON values.
pub fn read_ndjson(dir: &Path) -> Vec<serde_json::Value> {
    files(dir, ".ndjson")
        .into_iter()
        .flat_map(|p| {
            std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Total rows.
pub fn rows(batches: &[(PathBuf, RecordBatch)]) -> usize {
    batches.iter().map(|(_, b)| b.num_rows()).sum()
}

/// A command running the sluice binary built for these tests. With `SLUICE_TEST_LOG_DIR` set (scripts/test.sh sets it)
/// its output is also kept there (tests/tee_output.sh), and scripts/check_secrets.py checks that
/// no test secret appears in any of it.
pub fn sluice() -> std::process::Command {
    let bin = env!("CARGO_BIN_EXE_sluice");
    let mut c = match std::env::var_os("SLUICE_TEST_LOG_DIR") {
        Some(_) => {
            let mut c = std::process::Command::new("bash");
            c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tee_output.sh")).arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    c.env("RUST_LOG", "warn");
    c
}

/// Runs a Python helper under tests/ with the test virtualenv's Python; returns its stdout.
pub fn python_tool(script: &str, args: &[&str]) -> String {
    python_tool_env(script, args, &[])
}

/// [`python_tool`] with more environment variables (kept off its command line).
pub fn python_tool_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    try_python_tool_env(script, args, env).unwrap_or_else(|e| panic!("{e}"))
}

/// [`python_tool_env`], with a failure of the tool (a server it reads restarting, say) as `Err`.
pub fn try_python_tool_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let mut command = std::process::Command::new(python);
    command.arg(path).args(args).envs(env.iter().copied());
    let out = command.output().expect("python runs");
    if !out.status.success() {
        return Err(format!(
            "{script} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// The `peak memory (RSS)` figure of sluice's run summary, in MiB.
pub fn peak_rss_mib(stderr: &str) -> f64 {
    let peak = stderr.split("peak memory (RSS) ").nth(1).unwrap_or_else(|| panic!("no peak in: {stderr}"));
    let mut parts = peak.split_whitespace();
    let value: f64 = parts.next().unwrap().parse().unwrap();
    match parts.next().unwrap() {
        "KiB" => value / 1024.0,
        "MiB" => value,
        "GiB" => value * 1024.0,
        other => panic!("unit {other}"),
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The samples of metric `name` in a Prometheus text exposition: each line's labels (the text
/// between the braces, empty without) and value.
pub fn samples<'a>(exposition: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    exposition.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse().ok()?))
    })
}

/// A plain HTTP GET on 127.0.0.1: the status code and the whole response, or None when the
/// server is not there (yet).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let code = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body))
}
