//! A private Garage S3 server for one test (its own directory and ports on 127.0.0.1), for what
//! the shared server of scripts/test.sh cannot be used for: killing and restarting it mid-run.
//! It takes the shared server's access key (`garage key import`), so pipelines and
//! tests/s3_tool.py only change the endpoint.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_port;

pub(crate) struct Garage {
    dir: tempfile::TempDir,
    /// The S3 API port.
    pub port: u16,
    server: Option<Child>,
}

fn garage_bin() -> PathBuf {
    match std::env::var("SLUICE_TEST_GARAGE") {
        Ok(p) => p.into(),
        Err(_) => panic!("SLUICE_TEST_GARAGE is not set: run the tests with scripts/test.sh, which installs Garage"),
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test.sh"))
}

impl Garage {
    /// Configures a single-node layout, imports the shared server's key (allowed to create
    /// buckets) and creates `bucket`.
    pub(crate) fn start(bucket: &str) -> Garage {
        let dir = tempfile::Builder::new().prefix("sluice-garage-").tempdir_in("/tmp").unwrap();
        let port = free_port();
        let secret: String = (0..32).map(|i| format!("{:02x}", (port as usize * 31 + i * 97) % 251)).collect();
        std::fs::write(
            dir.path().join("garage.toml"),
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                d = dir.path().display(),
                rpc = free_port(),
                admin = free_port(),
            ),
        )
        .unwrap();
        let mut g = Garage { dir, port, server: None };
        g.start_again();
        let started = Instant::now();
        let node = loop {
            let status = g.cli(&["status"], false);
            let node = status.lines().find_map(|l| {
                let id = l.split_whitespace().next()?;
                (id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
            });
            if let Some(node) = node {
                break node;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "garage did not report its node id:\n{status}");
            std::thread::sleep(Duration::from_millis(200));
        };
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node], true);
        g.cli(&["layout", "apply", "--version", "1"], true);
        let key = env("SLUICE_TEST_S3_KEY_ID");
        g.cli(&["key", "import", "--yes", "-n", "sluice-test", &key, &env("SLUICE_TEST_S3_SECRET")], true);
        g.cli(&["key", "allow", "--create-bucket", &key], true);
        g.cli(&["bucket", "create", bucket], true);
        g.cli(&["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", &key], true);
        g
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the garage CLI against this server; its stdout. With `check`, a failure panics (with
    /// the subcommand only: the key import's arguments hold the secret).
    fn cli(&self, args: &[&str], check: bool) -> String {
        let out = Command::new(garage_bin()).arg("-c").arg(self.dir.path().join("garage.toml")).args(args).output();
        let out = out.expect("garage runs");
        assert!(!check || out.status.success(), "garage {} failed: {}", args[0], String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL: no shutdown of any kind.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server on its directory (what it had is kept) and waits for its S3 port.
    pub(crate) fn start_again(&mut self) {
        assert!(self.server.is_none(), "garage is running");
        let log = std::fs::File::options().create(true).append(true).open(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("garage starts");
        self.server = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "garage did not listen on {}:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
