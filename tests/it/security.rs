//! Kafka over mutual TLS with SASL/SCRAM, end to end, with certificates made here by openssl.
//!
//! tansu 0.6 authenticates SCRAM users (`--authentication`, `tansu user create`), but its listener
//! speaks no TLS: with `--cert` it still reads plaintext frames (a TLS client hello is taken for a
//! frame length and the connection ends in "early eof"). So TLS is terminated by [`TlsProxy`]
//! (rustls, client certificates required) in front of a tansu this test starts, which advertises
//! the proxy's address: every connection the clients make, after bootstrap too, goes through TLS,
//! and SASL runs inside it against the broker's own user store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

use crate::common::{python_tool_env, read_parquet, sluice};

const PASSWORD_256: &str = "it-scram256-Vq3xK9pLm2";
const PASSWORD_512: &str = "it-scram512-Hd8sWz4nRt";
const WRONG_PASSWORD: &str = "it-wrong-Yb7cQe1uJo";

pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed, and a
/// second CA that signed nothing the broker has.
pub(crate) struct Certs {
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
}

pub(crate) fn make_certs(dir: &Path) -> Certs {
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=sluice-it-{ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=sluice-it-{name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    Certs {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        server: (dir.join("server.pem"), dir.join("server.key")),
        client: (dir.join("client.pem"), dir.join("client.key")),
    }
}

/// Terminates TLS (client certificate required) and forwards the plaintext to `upstream`.
struct TlsProxy {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsProxy {
    fn start(upstream: SocketAddr, certs: &Certs) -> TlsProxy {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&certs.server.0).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(&certs.server.1).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&certs.ca).unwrap()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (handshakes, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (h, r) = (handshakes.clone(), refused.clone());
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, h, r) = (acceptor.clone(), h.clone(), r.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            h.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut up) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                            }
                        }
                        Err(_) => {
                            r.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        TlsProxy { addr, handshakes, refused, runtime: Some(runtime) }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A tansu of this test's own (sqlite engine, in `dir`), killed on drop.
pub(crate) struct Tansu(Child);

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tansu_bin() -> String {
    std::env::var("SLUICE_TEST_TANSU")
        .expect("SLUICE_TEST_TANSU is not set: run the tests with scripts/test.sh, which installs tansu")
}

pub(crate) fn start_tansu(dir: &Path, port: u16, advertised: SocketAddr, authentication: bool) -> Tansu {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("tansu-{authentication}.log")))
        .unwrap();
    let mut c = Command::new(tansu_bin());
    c.args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
        .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null());
    if authentication {
        c.arg("--authentication");
    }
    let child = Tansu(c.spawn().expect("tansu starts"));
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "tansu did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// A broker that requires SCRAM users `it-256` (SHA-256) and `it-512` (SHA-512), reachable only
/// through the TLS proxy.
fn secure_broker(dir: &Path, certs: &Certs) -> (Tansu, TlsProxy) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let proxy = TlsProxy::start(SocketAddr::from(([127, 0, 0, 1], port)), certs);
    // Users are created while the broker is open (creating one needs a connection), then the broker
    // restarts with authentication on the same store.
    {
        let _open = start_tansu(dir, port, proxy.addr, false);
        for (user, password, mechanism) in [("it-256", PASSWORD_256, "scram256"), ("it-512", PASSWORD_512, "scram512")]
        {
            let out = Command::new(tansu_bin())
                .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{port}"), "--mechanism", mechanism])
                .args([user, password])
                .output()
                .unwrap();
            assert!(out.status.success(), "tansu user create {user}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let broker = start_tansu(dir, port, proxy.addr, true);
    (broker, proxy)
}

fn tool(config: &serde_json::Value, args: &[&str]) -> String {
    python_tool_env("kafka_tool.py", args, &[("KAFKA_TOOL_CONFIG", &config.to_string())])
}

fn pipeline(brokers: &str, topic: &str, out: &Path, source_tls: &str) -> String {
    format!(
        r#"
[pipeline]
name = "kafka-secure"

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{topic}-g"
format = {{ type = "json" }}
schema = {{ order_id = "bigint not null", amount = "decimal(10,2)", status = "varchar" }}
tls = {{ {source_tls} }}
sasl = {{ mechanism = "SCRAM-SHA-256", username = "it-256", password = "${{SLUICE_IT_KAFKA_PASSWORD}}" }}

[sinks.lake]
type = "file"
inputs = ["orders"]
path = "{out}/lake"

[sinks.copy]
type = "kafka"
inputs = ["orders"]
brokers = "{brokers}"
topic = "{topic}-copy"
tls = {{ {source_tls} }}
sasl = {{ mechanism = "SCRAM-SHA-512", username = "it-512", password_file = "{out}/password-512" }}
"#,
        out = out.display()
    )
}

#[test]
fn kafka_over_mutual_tls_with_sasl_scram_reads_and_writes_and_refuses_wrong_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (_broker, proxy) = secure_broker(dir.path(), &certs);
    let brokers = proxy.addr.to_string();
    let client_tls = format!(
        r#"ca_file = "{}", cert_file = "{}", key_file = "{}""#,
        certs.ca.display(),
        certs.client.0.display(),
        certs.client.1.display()
    );
    let config = serde_json::json!({
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": certs.ca,
        "ssl.certificate.location": certs.client.0,
        "ssl.key.location": certs.client.1,
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "it-256",
        "sasl.password": PASSWORD_256,
    });
    let topic = crate::kafka::topic("secure");
    tool(&config, &["create", "--brokers", &brokers, "--topic", &topic, "--partitions", "3"]);
    tool(&config, &["create", "--brokers", &brokers, "--topic", &format!("{topic}-copy"), "--partitions", "1"]);
    let manifest = dir.path().join("manifest.json");
    tool(
        &config,
        &[
            "produce",
            "--brokers",
            &brokers,
            "--topic",
            &topic,
            "--partitions",
            "3",
            "--count",
            "3000",
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    std::fs::write(dir.path().join("password-512"), format!("{PASSWORD_512}\n")).unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, pipeline(&brokers, &topic, dir.path(), &client_tls)).unwrap();
    let out = sluice()
        .args(["run", "--bounded", "--no-progress"])
        .arg(&p)
        .env("SLUICE_IT_KAFKA_PASSWORD", PASSWORD_256)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let mut ids: Vec<i64> = read_parquet(&dir.path().join("lake"))
        .iter()
        .flat_map(|(_, b)| b.column_by_name("order_id").unwrap().as_primitive::<Int64Type>().values().to_vec())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=3000).collect::<Vec<i64>>(), "every record read once over TLS + SASL");
    let mut config_512 = config.clone();
    config_512["sasl.mechanism"] = "SCRAM-SHA-512".into();
    config_512["sasl.username"] = "it-512".into();
    config_512["sasl.password"] = PASSWORD_512.into();
    let copied =
        tool(&config_512, &["read", "--brokers", &brokers, "--topic", &format!("{topic}-copy"), "--expect", "3000"]);
    assert_eq!(copied.lines().count(), 3000, "the Kafka sink wrote through TLS + SCRAM-SHA-512");
    assert!(proxy.handshakes.load(Ordering::SeqCst) > 0);

    // Wrong credentials, each in a run of its own (in parallel: each waits out the broker timeout).
    let no_client_cert = format!(r#"ca_file = "{}""#, certs.ca.display());
    let wrong_ca = client_tls.replace(&certs.ca.display().to_string(), &certs.other_ca.display().to_string());
    let cases = [
        ("a wrong password", client_tls.clone(), WRONG_PASSWORD, "authentication"),
        ("no client certificate", no_client_cert, PASSWORD_256, ""),
        ("a CA that did not sign the broker's certificate", wrong_ca, PASSWORD_256, "certificate verify failed"),
    ];
    let refused_before = proxy.refused.load(Ordering::SeqCst);
    let runs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (what, tls, password, _))| {
            let case = dir.path().join(format!("case-{i}"));
            std::fs::create_dir_all(&case).unwrap();
            std::fs::write(case.join("password-512"), format!("{PASSWORD_512}\n")).unwrap();
            let p = case.join("p.toml");
            std::fs::write(&p, pipeline(&brokers, &topic, &case, tls)).unwrap();
            let child = sluice()
                .args(["run", "--bounded", "--no-progress"])
                .arg(&p)
                .env("SLUICE_IT_KAFKA_PASSWORD", password)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (*what, child)
        })
        .collect();
    for ((what, child), (_, _, _, want)) in runs.into_iter().zip(&cases) {
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(3), "{what}: a runtime failure, not a hang or a success: {text}");
        // The error itself says why, not only a log line before it: librdkafka's reason reaches
        // the context only when the client is polled, which the failing request alone does not do.
        let error = text.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
        assert!(error.to_lowercase().contains(want), "{what}: the error says why ({want}): {text}");
        for secret in [PASSWORD_256, PASSWORD_512, WRONG_PASSWORD] {
            assert!(!text.contains(secret), "{what}: a password is in the output: {text}");
        }
    }
    assert!(proxy.refused.load(Ordering::SeqCst) > refused_before, "the proxy refused the run without a certificate");
}

/// PostgreSQL over TLS against a private server with certificates made here: the server takes
/// TCP connections over TLS only. The sink writes and the source reads back over TLS (the server's
/// log shows each sluice connection with its TLS protocol); a URL without `sslmode` is refused by
/// the server, and a CA that did not sign its certificate is refused by sluice.
#[test]
fn postgres_over_tls_with_test_made_certificates_and_plaintext_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let cluster = crate::pg_cluster::PgCluster::start(Some((&certs.server.0, &certs.server.1)));
    let input = dir.path().join("in.ndjson");
    std::fs::write(
        &input,
        (1..=500).map(|i| format!("{{\"order_id\": {i}, \"note\": \"n{i}\"}}\n")).collect::<String>(),
    )
    .unwrap();
    let base = cluster.url_via(cluster.port);
    let pipeline = |url: &str, ca: &Path, out: &Path| {
        format!(
            r#"
[pipeline]
name = "pg-tls-private"

[sources.orders]
type = "file"
path = "{input}"
format = {{ type = "json" }}
schema = {{ order_id = "bigint not null", note = "varchar" }}

[sinks.pg]
type = "postgres"
inputs = ["orders"]
url = "{url}"
table = "public.orders"
create_table = true
tls = {{ ca_file = "{ca}" }}

[dead_letter]
type = "file"
path = "{out}"
"#,
            input = input.display(),
            ca = ca.display(),
            out = out.display()
        )
    };
    let p = dir.path().join("ok.toml");
    std::fs::write(&p, pipeline(&format!("{base}?sslmode=require"), &certs.ca, &dir.path().join("dl"))).unwrap();
    let out = sluice().args(["run", "--no-progress"]).arg(&p).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cluster.psql("SELECT count(*), sum(order_id) FROM public.orders"), "500|125250");
    // Read back over TLS with the source.
    let back = dir.path().join("back.toml");
    std::fs::write(
        &back,
        format!(
            r#"
[pipeline]
name = "pg-tls-read"

[sources.t]
type = "postgres"
url = "{base}?sslmode=require"
table = "public.orders"
tls = {{ ca_file = "{ca}" }}

[sinks.out]
type = "file"
inputs = ["t"]
path = "{out}"
format = "parquet"
"#,
            ca = certs.ca.display(),
            out = dir.path().join("back").display()
        ),
    )
    .unwrap();
    let out = sluice().args(["run", "--no-progress"]).arg(&back).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: i64 = read_parquet(&dir.path().join("back"))
        .iter()
        .map(|(_, b)| b.column_by_name("order_id").unwrap().as_primitive::<Int64Type>().iter().flatten().sum::<i64>())
        .sum();
    assert_eq!(ids, 125250, "every row read back over TLS");
    let log = cluster.server_log();
    let tls_connections =
        log.lines().filter(|l| l.contains("application_name=sluice") && l.contains("SSL enabled")).count();
    let clear = log
        .lines()
        .filter(|l| {
            l.contains("application_name=sluice") && !l.contains("SSL enabled") && l.contains("connection authorized")
        })
        .count();
    assert!(
        tls_connections >= 2 && clear == 0,
        "sluice's connections use TLS: {tls_connections} over TLS, {clear} in clear\n{log}"
    );

    // No sslmode: TLS off, and the server refuses plaintext.
    let case = |url: String, ca: &Path, name: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, pipeline(&url, ca, &dir.path().join(name))).unwrap();
        let out = sluice().args(["run", "--no-progress"]).arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "{name}: {err}");
        assert!(
            err.contains(&format!("127.0.0.1:{}/postgres", cluster.port)),
            "{name}: the error names the server: {err}"
        );
        err
    };
    let err = case(base.clone(), &certs.ca, "plaintext");
    assert!(err.contains("no encryption") || err.contains("pg_hba.conf"), "plaintext refused by the server: {err}");
    let err = case(format!("{base}?sslmode=require"), &certs.other_ca, "wrong-ca");
    assert!(err.to_lowercase().contains("certificate"), "a certificate the CA did not sign is refused: {err}");
    assert_eq!(cluster.psql("SELECT count(*) FROM public.orders"), "500", "the refused runs wrote nothing");
}
