//! The HTTP client workers and `sluice status` use to reach the coordinator.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{HeartbeatRequest, HeartbeatResponse, LeaveRequest, Status};

/// A coordinator at `base` (e.g. `http://sluice-coordinator:7070`), called with a bearer token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    /// Whether calls present a client certificate (for the hint in [`Client::failed`]).
    client_cert: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("token", &"<redacted>").finish()
    }
}

impl Client {
    /// `tls` applies to an `https://` URL (see [`super::tls::ClientTls`]).
    ///
    /// # Errors
    /// When `base` is not an http(s) URL, or the TLS files cannot be used.
    pub fn new(base: &str, token: &str, timeout: Duration, tls: &super::tls::ClientTls) -> Result<Self, String> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("the coordinator URL must start with http:// or https://, not `{base}`"));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .use_preconfigured_tls(tls.config()?)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Client { base, token: token.to_string(), http, client_cert: tls.cert.is_some() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R, String> {
        let url = format!("{}{path}", self.base);
        let r = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| self.failed("POST", &url, &e))?;
        read(r, &url).await
    }

    /// # Errors
    /// An unreachable coordinator, a refused token, a malformed answer.
    pub async fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, String> {
        self.post("/v1/heartbeat", req).await
    }

    /// # Errors
    /// As for [`heartbeat`](Self::heartbeat).
    pub async fn leave(&self, worker_id: &str) -> Result<(), String> {
        let _: serde_json::Value = self.post("/v1/leave", &LeaveRequest { worker_id: worker_id.to_string() }).await?;
        Ok(())
    }

    /// # Errors
    /// As for [`heartbeat`](Self::heartbeat).
    pub async fn status(&self) -> Result<Status, String> {
        let url = format!("{}/v1/status", self.base);
        let r = self.http.get(&url).bearer_auth(&self.token).send().await.map_err(|e| self.failed("GET", &url, &e))?;
        read(r, &url).await
    }
}

impl Client {
    /// A call that got no answer. Under TLS 1.3 the client's side of the handshake is done before the server has
    /// checked the client certificate, so a certificate the coordinator refuses shows up either as its alert
    /// (`UnknownCA`, ...) or, when the request was already on its way, only as a closed connection: say what that
    /// most likely means.
    fn failed(&self, method: &str, url: &str, e: &reqwest::Error) -> String {
        let mut msg = format!("{method} {url}: {}", with_causes(e));
        let closed_after_handshake = self.client_cert
            && self.base.starts_with("https://")
            && !e.is_timeout()
            && !e.is_connect()
            && !msg.contains("UnknownCA");
        if closed_after_handshake {
            msg.push_str(
                " (the coordinator closed the connection after the TLS handshake: if it requires client certificates, \
                 check that SLUICE_WORKER_TLS_CERT is signed by the CA it was given with --tls-client-ca)",
            );
        }
        msg
    }
}

async fn read<R: DeserializeOwned>(r: reqwest::Response, url: &str) -> Result<R, String> {
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("{url}: reading the answer: {}", with_causes(&e)))?;
    if !status.is_success() {
        return Err(format!("{url} answered {status}: {}", text.chars().take(300).collect::<String>()));
    }
    serde_json::from_str(&text).map_err(|e| format!("{url}: the answer is not what sluice expects: {e}"))
}

/// reqwest's message with its causes.
fn with_causes(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
