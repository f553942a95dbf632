//! Settings shared by the Kafka source and sink: brokers, TLS, SASL and raw librdkafka options,
//! turned into an rdkafka [`ClientConfig`].

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use rdkafka::ClientConfig;
use serde::Deserialize;

/// How long metadata, watermark and offset requests may take before the broker counts as
/// unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// `tls = { ... }`: encrypt the connection (and authenticate with a client certificate).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) (PEM) that signed the brokers' certificates; the system's CAs when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that require mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Password of the private key, when it is encrypted.
    pub key_password: Option<String>,
    /// Check that the broker's certificate names the host connected to (default true).
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

fn yes() -> bool {
    true
}

/// SASL mechanisms sluice configures.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `sasl = { mechanism, username, password | password_file }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// The password, normally `${VAR}` from the environment.
    pub password: Option<String>,
    /// A file holding the password (a mounted Secret); trailing newlines are ignored.
    pub password_file: Option<PathBuf>,
}

/// The connection settings a Kafka source or sink table carries.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub brokers: String,
    pub tls: Option<TlsConfig>,
    pub sasl: Option<SaslConfig>,
    pub librdkafka_options: IndexMap<String, String>,
}

/// librdkafka options whose values are secrets: never echoed.
pub fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key.pem") || k.contains("sasl.oauthbearer.config")
}

impl Connection {
    /// The client configuration. `defaults` are sluice's settings for the role (consumer or
    /// producer); `librdkafka_options` override them.
    ///
    /// # Errors
    /// `(key, message)`: a password file that cannot be read, SASL without a password, or an
    /// option sluice manages itself.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig, (&'static str, String)> {
        let mut c = ClientConfig::new();
        if self.brokers.trim().is_empty() {
            return Err(("brokers", "no brokers given; write e.g. brokers = \"kafka-0:9092,kafka-1:9092\"".into()));
        }
        c.set("bootstrap.servers", self.brokers.trim());
        c.set("client.id", "sluice");
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        let protocol = match (self.tls.is_some(), self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        if let Some(tls) = &self.tls {
            for (key, value) in [
                ("ssl.ca.location", &tls.ca_file),
                ("ssl.certificate.location", &tls.cert_file),
                ("ssl.key.location", &tls.key_file),
            ] {
                if let Some(path) = value {
                    if !path.exists() {
                        return Err(("tls", format!("`{}` does not exist ({key})", path.display())));
                    }
                    c.set(key, path.display().to_string());
                }
            }
            if let Some(p) = &tls.key_password {
                c.set("ssl.key.password", p);
            }
            c.set("ssl.endpoint.identification.algorithm", if tls.verify_hostname { "https" } else { "none" });
        }
        if let Some(sasl) = &self.sasl {
            let password = match (&sasl.password, &sasl.password_file) {
                (Some(p), None) => p.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| ("sasl.password_file", format!("cannot read `{}`: {e}", path.display())))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
                (Some(_), Some(_)) => {
                    return Err(("sasl", "give either `password` or `password_file`, not both".into()));
                }
                (None, None) => {
                    return Err(("sasl", "SASL needs `password = \"${VAR}\"` or `password_file`".into()));
                }
            };
            c.set("sasl.mechanism", sasl.mechanism.as_str());
            c.set("sasl.username", &sasl.username);
            c.set("sasl.password", password);
        }
        for (k, v) in &self.librdkafka_options {
            if MANAGED.contains(&k.as_str()) {
                return Err((
                    "librdkafka_options",
                    format!("`{k}` is managed by sluice (offsets are committed only once the sinks have the records)"),
                ));
            }
            c.set(k, v);
        }
        Ok(c)
    }
}

/// Options sluice must control for its delivery guarantees.
const MANAGED: &[&str] = &["enable.auto.commit", "enable.auto.offset.store", "enable.partition.eof"];

/// librdkafka's error text with any secret option values removed (it never prints them, but a
/// misconfigured option can echo what it was given).
pub fn redact(message: &str, connection: &Connection) -> String {
    let mut out = message.to_string();
    let mut secrets: Vec<&str> = connection
        .librdkafka_options
        .iter()
        .filter(|(k, v)| is_secret_option(k) && !v.is_empty())
        .map(|(_, v)| v.as_str())
        .collect();
    if let Some(p) = connection.sasl.as_ref().and_then(|s| s.password.as_deref()) {
        secrets.push(p);
    }
    if let Some(p) = connection.tls.as_ref().and_then(|s| s.key_password.as_deref()) {
        secrets.push(p);
    }
    for s in secrets.into_iter().filter(|s| s.len() >= 3) {
        out = out.replace(s, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        Connection { brokers: "127.0.0.1:9092".into(), ..Default::default() }
    }

    #[test]
    fn protocol_follows_tls_and_sasl() {
        let c = conn().client_config(&[]).unwrap();
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        let mut s = conn();
        s.sasl = Some(SaslConfig {
            mechanism: SaslMechanism::ScramSha512,
            username: "u".into(),
            password: Some("hunter22".into()),
            password_file: None,
        });
        s.tls = Some(TlsConfig { verify_hostname: true, ..Default::default() });
        let c = s.client_config(&[]).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(redact("auth failed for hunter22", &s), "auth failed for ***");
    }

    #[test]
    fn password_file_is_read_and_managed_options_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let mut s = conn();
        s.sasl = Some(SaslConfig {
            mechanism: SaslMechanism::Plain,
            username: "u".into(),
            password: None,
            password_file: Some(f),
        });
        assert_eq!(s.client_config(&[]).unwrap().get("sasl.password"), Some("s3cret"));
        let mut m = conn();
        m.librdkafka_options.insert("enable.auto.commit".into(), "true".into());
        let (key, msg) = m.client_config(&[]).unwrap_err();
        assert_eq!(key, "librdkafka_options");
        assert!(msg.contains("enable.auto.commit"), "{msg}");
        let missing = Connection {
            tls: Some(TlsConfig { ca_file: Some("/nope/ca.pem".into()), ..Default::default() }),
            ..conn()
        };
        assert!(missing.client_config(&[]).unwrap_err().1.contains("/nope/ca.pem"));
    }
}
