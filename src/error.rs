//! The crate's runtime error type: what failed, where, and what to do about it.

use std::path::PathBuf;

/// Errors raised while building or running a pipeline.
///
/// Configuration problems found before anything runs are [`crate::config::ConfigError`]s; this type
/// covers everything that can go wrong once components exist.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline definition is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    /// A file or directory could not be read or written.
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A record could not be processed and the pipeline has no `[dead_letter]` sink to receive it.
    #[error(
        "bad record in component `{component}` at {position}: {error}\n  (add a [dead_letter] sink to the pipeline to divert bad records and keep running)"
    )]
    BadRecord { component: String, position: String, error: String },

    /// Arrow failed outside a per-record context (schema mismatch between components, say).
    #[error("component `{component}`: {source}")]
    Arrow {
        component: String,
        #[source]
        source: arrow::error::ArrowError,
    },

    /// Parquet encoding or decoding failed.
    #[error("component `{component}`: {source}")]
    Parquet {
        component: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// DataFusion failed to execute a plan for a reason that is not tied to individual rows.
    #[error("component `{component}`: {source}")]
    DataFusion {
        component: String,
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },

    /// An external service (a Kafka broker, a database, an object store) failed or refused.
    #[error("component `{component}`: {message}")]
    Service { component: String, message: String },

    /// Worker mode: the shard moved to another worker, or this worker's lease expired, so its
    /// commit or write was refused (nothing of it became visible; the new owner reads it again).
    #[error("component `{component}`: fenced: {message}")]
    Fenced { component: String, message: String },

    /// The metrics / health server could not start.
    #[error("metrics server on {addr}: {message}")]
    Metrics { addr: String, message: String },

    /// A spawned task panicked or was cancelled unexpectedly.
    #[error("internal error in component `{component}`: {message}")]
    Internal { component: String, message: String },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }

    pub(crate) fn arrow(component: &str, source: arrow::error::ArrowError) -> Self {
        Error::Arrow { component: component.to_string(), source }
    }

    pub(crate) fn parquet(component: &str, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet { component: component.to_string(), source }
    }

    pub(crate) fn datafusion(component: &str, source: datafusion::error::DataFusionError) -> Self {
        Error::DataFusion { component: component.to_string(), source: Box::new(source) }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
