//! A private PostgreSQL cluster for one test (initdb + pg_ctl, on a free port of 127.0.0.1), for
//! what the machine's server cannot be used for: restarting it mid-run, or TLS only. initdb
//! refuses to run as root, so as root the cluster belongs to the `postgres` user (`runuser`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub(crate) struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    options: String,
}

/// The newest server's binaries (Debian: /usr/lib/postgresql/N/bin), else whatever is on PATH.
fn bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = glob::glob("/usr/lib/postgresql/*/bin").unwrap().flatten().collect();
    dirs.sort_by_key(|d| {
        d.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    dirs.pop().unwrap_or_default()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl PgCluster {
    /// initdb (trust auth for local and 127.0.0.1 connections) and start. With `tls` (certificate,
    /// key), the server has `ssl = on` and takes TCP connections over TLS only.
    pub(crate) fn start(tls: Option<(&Path, &Path)>) -> PgCluster {
        let dir = tempfile::Builder::new().prefix("sluice-pg-").tempdir_in("/tmp").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = PgCluster { dir, port, bin: bindir(), options: String::new() };
        let data = c.data();
        c.own(c.dir.path());
        c.cmd("initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]);
        let sock = c.dir.path().display().to_string();
        // fsync off: a restart here is a process crash, the page cache survives it.
        let mut options =
            format!("-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c log_connections=on");
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).unwrap();
            }
            c.own(&data);
            c.chmod_key(&data.join("server.key"));
            options.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
            // TCP over TLS only; the local socket (the test's own psql) stays open.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
            c.own(&data);
        }
        c.options = options;
        c.pg_ctl_start();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn own(&self, path: &Path) {
        if is_root() {
            let out = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).output().unwrap();
            assert!(
                out.status.success(),
                "chown postgres {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn chmod_key(&self, key: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Runs one of the server's programs (as `postgres` when root); panics with its output on failure.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let program = if path.exists() { path.display().to_string() } else { program.to_string() };
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &program]);
            c
        } else {
            Command::new(&program)
        }
    }

    fn cmd(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
        out
    }

    fn pg_ctl_start(&self) {
        let (data, log) = (self.data(), self.dir.path().join("server.log"));
        self.cmd(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &self.options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server the way a crash would (`-m immediate`: no checkpoint, connections cut).
    pub(crate) fn kill(&self) {
        self.cmd("pg_ctl", &["-D", self.data().to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }

    /// Starts it again after [`PgCluster::kill`] (crash recovery runs first).
    pub(crate) fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// A URL for database `postgres` on `port` (the server's, or a proxy's in front of it).
    pub(crate) fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    /// Runs SQL over the local socket; returns its unaligned, tuples-only output.
    pub(crate) fn psql(&self, sql: &str) -> String {
        let out = self.psql_command(sql).output().unwrap();
        assert!(out.status.success(), "psql failed on {sql}:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// [`PgCluster::psql`], or None when it fails (the server is down).
    pub(crate) fn try_psql(&self, sql: &str) -> Option<String> {
        let out = self.psql_command(sql).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
    }

    fn psql_command(&self, sql: &str) -> Command {
        let sock = self.dir.path().display().to_string();
        let mut c = self.command("psql");
        c.args(["-h", &sock, "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql])
            .current_dir(self.dir.path());
        c
    }

    /// The server's log so far (connections are logged, with their TLS protocol if any).
    pub(crate) fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Waits until SQL over the socket answers (after a restart).
    pub(crate) fn wait_ready(&self, limit: Duration) {
        let started = std::time::Instant::now();
        let sock = self.dir.path().display().to_string();
        let ready = || {
            let out = self.command("pg_isready").args(["-h", &sock, "-p", &self.port.to_string()]).output();
            out.is_ok_and(|o| o.status.success())
        };
        while !ready() {
            assert!(started.elapsed() < limit, "the private PostgreSQL did not come back in {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.command("pg_ctl").args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]).output();
    }
}
