//! Worker ↔ coordinator over mutual TLS, with certificates made here by openssl: a worker with
//! a client certificate the coordinator's CA signed runs its shards into PostgreSQL; callers with
//! no client certificate, one from another CA, a wrong token, plain HTTP, or a server they do not
//! trust are refused, and the refusals are logged without any secret.

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::sluice;
use crate::coordinator::{count, pg_pipeline, TOKEN};
use crate::kafka::{create, produce, topic, KillOnDrop};
use crate::postgres::schema;
use crate::security::{make_certs, openssl};

const WRONG_TOKEN: &str = "wrong-token-tls-7c1e";

/// `sluice status --json` with this environment (TLS settings, token).
fn status(url: &str, env: &[(&str, &Path)], token: &str) -> Output {
    sluice()
        .env_remove("SLUICE_COORDINATOR_CA")
        .env_remove("SLUICE_WORKER_TLS_CERT")
        .env_remove("SLUICE_WORKER_TLS_KEY")
        .env("SLUICE_COORDINATOR_TOKEN", token)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .args(["status", "--json", "--coordinator", url])
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stop(mut child: Child, what: &str, log: &Path) {
    let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{what} stops cleanly:\n{}", std::fs::read_to_string(log).unwrap());
}

/// GET `url` over TLS trusting `ca`, with no client certificate (as the kubelet's probes do).
fn get_without_client_cert(url: &str, ca: &Path) -> String {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import ssl, sys, urllib.request\n\
        ctx = ssl.create_default_context(cafile=sys.argv[1])\n\
        print(urllib.request.urlopen(sys.argv[2], context=ctx, timeout=10).read().decode())";
    let out = std::process::Command::new(python).args(["-c", script]).arg(ca).arg(url).output().unwrap();
    assert!(out.status.success(), "GET {url}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn coordinator_over_mutual_tls_serves_trusted_workers_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = make_certs(d);
    // A client certificate from a CA the coordinator does not trust.
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=sluice-it-rogue",
            "-keyout",
            "rogue.key",
            "-out",
            "rogue.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "rogue.csr",
            "-CA",
            "other-ca.pem",
            "-CAkey",
            "other-ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-out",
            "rogue.pem",
        ],
    );
    let t = topic("mtls");
    create(&t, 2);
    let m = produce(&t, 2, 2000, 1, 0, d);
    let table = format!("{}.orders", schema("coord_mtls"));
    let p = d.join("p.toml");
    std::fs::write(&p, pg_pipeline("mtls", &t, &table)).unwrap();
    let port = crate::common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let coordinator = |extra: &[&std::ffi::OsStr], log: &Path| {
        sluice()
            .env("SLUICE_COORDINATOR_TOKEN", TOKEN)
            .env("RUST_LOG", "sluice=info")
            .args(["coordinator", "--lease-timeout", "3s", "--heartbeat-interval", "500ms", "--refresh-interval", "1s"])
            .arg("--pipeline")
            .arg(&p)
            .args(["--listen", &listen])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let os = |p: &Path| p.as_os_str().to_owned();
    let (cert, key, ca) = (os(&certs.server.0), os(&certs.server.1), os(&certs.ca));

    // Half a setting is a configuration error (exit 1), named.
    for (args, want) in [
        (vec!["--tls-cert".as_ref(), cert.as_os_str()], "--tls-cert and --tls-key go together"),
        (vec!["--tls-client-ca".as_ref(), ca.as_os_str()], "--tls-client-ca needs --tls-cert and --tls-key"),
    ] {
        let log = d.join("bad.log");
        let status = coordinator(&args, &log).wait().unwrap();
        let got = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}: {got}");
        assert!(got.contains(want), "{args:?}: the error says `{want}`: {got}");
    }

    let log = d.join("coordinator.log");
    let args: Vec<&std::ffi::OsStr> =
        vec!["--tls-cert".as_ref(), &cert, "--tls-key".as_ref(), &key, "--tls-client-ca".as_ref(), &ca];
    let coord = coordinator(&args, &log);
    let mut guard = KillOnDrop(vec![coord.id()]);
    let url = format!("https://{listen}");
    let trusted: [(&str, &Path); 3] = [
        ("SLUICE_COORDINATOR_CA", &certs.ca),
        ("SLUICE_WORKER_TLS_CERT", &certs.client.0),
        ("SLUICE_WORKER_TLS_KEY", &certs.client.1),
    ];
    let started = Instant::now();
    loop {
        let out = status(&url, &trusted, TOKEN);
        if out.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a trusted `sluice status` never got in: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A worker with the trusted client certificate runs every shard.
    let worker_log = d.join("worker.log");
    let worker = sluice()
        .env("SLUICE_COORDINATOR_TOKEN", TOKEN)
        .env("RUST_LOG", "sluice=info")
        .envs(trusted.iter().map(|(k, v)| (*k, v.as_os_str())))
        .args(["worker", "--worker", "w-tls", "--coordinator", &url])
        .arg("--pipeline")
        .arg(&p)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&worker_log).unwrap())
        .spawn()
        .unwrap();
    guard.0.push(worker.id());
    let started = Instant::now();
    while count(&table) < m.good.len() as i64 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} of {} rows through the TLS-coordinated worker:\n{}",
            count(&table),
            m.good.len(),
            std::fs::read_to_string(&worker_log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st: serde_json::Value = serde_json::from_slice(&status(&url, &trusted, TOKEN).stdout).unwrap();
    let workers = st["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{st}");
    assert_eq!(st["shards"].as_array().unwrap().len(), 2, "{st}");

    // Everyone else is refused.
    let ca_only: [(&str, &Path); 1] = [("SLUICE_COORDINATOR_CA", &certs.ca)];
    let rogue = [
        ("SLUICE_COORDINATOR_CA", certs.ca.as_path()),
        ("SLUICE_WORKER_TLS_CERT", &d.join("rogue.pem")),
        ("SLUICE_WORKER_TLS_KEY", &d.join("rogue.key")),
    ];
    let untrusted_server = [
        ("SLUICE_COORDINATOR_CA", certs.other_ca.as_path()),
        ("SLUICE_WORKER_TLS_CERT", &certs.client.0),
        ("SLUICE_WORKER_TLS_KEY", &certs.client.1),
    ];
    let plain = format!("http://{listen}");
    for (what, url, env, token, want) in [
        ("no client certificate", url.as_str(), &ca_only[..], TOKEN, &["no client certificate"][..]),
        // TLS 1.3: the refusal arrives as the server's alert, or, when the request was already sent, as a closed
        // connection that the client explains.
        (
            "a client certificate of another CA",
            &url,
            &rogue[..],
            TOKEN,
            &["UnknownCA", "signed by the CA it was given with --tls-client-ca"],
        ),
        ("a wrong token", &url, &trusted[..], WRONG_TOKEN, &["a wrong bearer token"]),
        ("a coordinator certificate the caller does not trust", &url, &untrusted_server[..], TOKEN, &["certificate"]),
        ("plain HTTP to the TLS port", &plain, &trusted[..], TOKEN, &["error sending request"]),
    ] {
        let out = status(url, env, token);
        let got = text(&out);
        eprintln!("{what}: exit {:?}: {}", out.status.code(), got.trim());
        assert!(!out.status.success(), "{what}: let in: {got}");
        assert!(want.iter().any(|w| got.contains(w)), "{what}: the error says one of {want:?}: {got}");
        assert!(!got.contains(TOKEN) && !got.contains(WRONG_TOKEN), "{what}: a token in the output: {got}");
    }

    // Probes and metrics need no client certificate (and no token).
    assert_eq!(get_without_client_cert(&format!("{url}/healthz"), &certs.ca).trim(), "ok");
    let metrics = get_without_client_cert(&format!("{url}/metrics"), &certs.ca);
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("sluice_coordinator_refused_calls_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no refused-calls counter in:\n{metrics}"));
    // No certificate, another CA's certificate, a wrong token, plain HTTP (a failed handshake).
    assert!(refused >= 4.0, "{refused} refusals counted");

    stop(worker, "the worker", &worker_log);
    stop(coord, "the coordinator", &log);
    let logs = std::fs::read_to_string(&log).unwrap();
    for want in [
        "https, client certificates required",
        "refused a call without a client certificate",
        "TLS handshake failed",
        "refused a call with a wrong bearer token",
    ] {
        assert!(logs.contains(want), "the coordinator logged `{want}`:\n{logs}");
    }
    let worker_logs = std::fs::read_to_string(&worker_log).unwrap();
    for secret in [TOKEN, WRONG_TOKEN] {
        assert!(!logs.contains(secret) && !worker_logs.contains(secret), "a token in the logs");
    }
    assert_eq!(count(&table), m.good.len() as i64, "every record once");
}
