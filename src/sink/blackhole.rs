//! The `blackhole` sink: counts records and drops them (for benchmarks).

use async_trait::async_trait;
use serde::Deserialize;

use super::Sink;
use crate::batch::Batch;
use crate::Result;

/// `[sinks.ID] type = "blackhole"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackholeSinkConfig {
    /// Upstream component ids.
    #[serde(default)]
    pub inputs: Vec<String>,
}

/// Drops every batch at once (its records count as delivered).
#[derive(Debug, Default)]
pub struct BlackholeSink;

#[async_trait]
impl Sink for BlackholeSink {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
