//! sluice: a streaming ETL worker runtime that moves Arrow record batches between sources, DataFusion
//! SQL transforms and sinks, with bounded memory, dead-letter handling and per-shard acknowledgements.

pub mod alloc;
pub mod autoscale;
pub mod batch;
pub mod config;
pub mod coordinator;
pub mod dead_letter;
pub mod error;
pub mod fence;
pub mod format;
pub mod fuzzing;
pub mod kafka;
pub mod observe;
pub mod postgres;
pub mod runtime;
pub mod s3;
pub mod sink;
pub mod source;
pub mod transform;

pub use error::{Error, Result};
