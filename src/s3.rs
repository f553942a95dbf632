//! Settings shared by the S3 source and sink (endpoint, region, credentials, retries), turned into
//! an `aws-sdk-s3` client.
//!
//! Retries are the SDK's standard mode: exponential backoff with full jitter on 5xx answers,
//! throttling (503 SlowDown, 429), timeouts and dropped connections, up to `max_attempts` tries per
//! request, each bounded by `request_timeout`.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::Client;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::{Error, Result};

/// Default tries per request (first try included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default limit on one try of one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Backoff before the first retry (doubling, with jitter, up to [`MAX_BACKOFF`]).
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A secret from the pipeline file (normally `${VAR}`): never shown by `Debug`.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The connection settings an S3 source or sink table carries.
#[derive(Clone, Default)]
pub struct Connection {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible server (MinIO, Ceph RGW, Garage); AWS when absent.
    pub endpoint: Option<String>,
    /// Region; `AWS_REGION` or the profile when absent, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default true when `endpoint` is set.
    pub force_path_style: Option<bool>,
    /// Static credentials (normally `${VAR}`s); the standard AWS chain (environment, profile, web
    /// identity, instance metadata) when absent.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub max_attempts: u32,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Checks what can be checked without a network call.
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.bucket.len() < 3 || self.bucket.len() > 63 {
            return Err(("bucket", format!("`{}` is not a valid bucket name (3 to 63 characters)", self.bucket)));
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(("endpoint", format!("`{e}` must start with http:// or https://")));
            }
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => {
                return Err(("secret_access_key", "access_key_id is set but secret_access_key is not".into()))
            }
            (None, Some(_)) => {
                return Err(("access_key_id", "secret_access_key is set but access_key_id is not".into()))
            }
            _ => {}
        }
        if self.max_attempts == 0 {
            return Err(("max_attempts", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Where requests go, for messages: `s3://bucket at http://host:port`.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("s3://{} at {e}", self.bucket),
            None => format!("s3://{}", self.bucket),
        }
    }

    /// Builds a client (reads the AWS environment and profile when credentials or region are not
    /// given).
    pub async fn client(&self) -> Client {
        let retry = RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(INITIAL_BACKOFF)
            .with_max_backoff(MAX_BACKOFF);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(self.request_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).retry_config(retry).timeout_config(timeouts);
        if let Some(r) = &self.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "sluice-config"));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(e) = &self.endpoint {
            b = b.endpoint_url(e.trim_end_matches('/'));
        }
        b = b.force_path_style(self.force_path_style.unwrap_or(self.endpoint.is_some()));
        Client::from_conf(b.build())
    }

    /// Builds a client and checks that the bucket exists and the credentials reach it.
    ///
    /// # Errors
    /// A [`Error::Service`] naming the bucket and the endpoint.
    pub async fn connect(&self, component: &str) -> Result<Client> {
        let client = self.client().await;
        if let Err(e) = client.head_bucket().bucket(&self.bucket).send().await {
            let why = match e.as_service_error() {
                Some(s) if s.is_not_found() => "the bucket does not exist".to_string(),
                _ => match e.raw_response().map(|r| r.status().as_u16()) {
                    Some(403) => "access denied (check the credentials and the bucket policy)".to_string(),
                    Some(301 | 400) => "the bucket is in another region or the endpoint is wrong".to_string(),
                    _ => describe_error(&e),
                },
            };
            return Err(service(component, format!("cannot reach {}: {why}", self.describe())));
        }
        Ok(client)
    }
}

/// A service error from a component.
pub fn service(component: &str, message: String) -> Error {
    Error::Service { component: component.to_string(), message }
}

/// An SDK error with its code and message, or its whole cause chain (connection refused, timeout).
pub fn describe_error<E, R>(e: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if let Some(s) = e.as_service_error() {
        if let Some(code) = s.code() {
            return format!("{code}: {}", s.message().unwrap_or("(no message)"));
        }
    }
    DisplayErrorContext(e).to_string()
}

/// Joins a prefix and a relative key with exactly one `/` between them.
pub fn join_key(prefix: &str, relative: &str) -> String {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        relative.to_string()
    } else {
        format!("{p}/{relative}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let ok = Connection {
            bucket: "data".into(),
            endpoint: Some("http://127.0.0.1:3900".into()),
            max_attempts: 3,
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let bad = Connection { bucket: "ab".into(), ..ok.clone() };
        assert_eq!(bad.validate().unwrap_err().0, "bucket");
        let bad = Connection { endpoint: Some("127.0.0.1:3900".into()), ..ok.clone() };
        assert_eq!(bad.validate().unwrap_err().0, "endpoint");
        let bad = Connection { access_key_id: Some("k".into()), ..ok.clone() };
        assert_eq!(bad.validate().unwrap_err().0, "secret_access_key");
    }

    #[test]
    fn keys_join_with_one_slash() {
        assert_eq!(join_key("", "a.parquet"), "a.parquet");
        assert_eq!(join_key("out/", "a.parquet"), "out/a.parquet");
        assert_eq!(join_key("/out/x", "dt=1/a.parquet"), "out/x/dt=1/a.parquet");
    }
}
