//! The `stdout` sink: prints records as NDJSON or as pretty tables.

use std::io::Write;

use async_trait::async_trait;
use serde::Deserialize;

use super::Sink;
use crate::batch::Batch;
use crate::{Error, Result};

/// `[sinks.ID] type = "stdout"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Upstream component ids.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// `"json"` (one object per line, the default) or `"pretty"` (a table per batch).
    #[serde(default)]
    pub format: StdoutFormat,
}

/// How the `stdout` sink prints.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StdoutFormat {
    #[default]
    Json,
    Pretty,
}

/// Prints batches to standard output.
pub struct StdoutSink {
    component: String,
    format: StdoutFormat,
}

impl StdoutSink {
    pub fn new(component: &str, config: &StdoutSinkConfig) -> Self {
        StdoutSink { component: component.to_string(), format: config.format }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        let mut out = Vec::new();
        match self.format {
            StdoutFormat::Json => {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
                w.write(&batch.data).and_then(|_| w.finish()).map_err(|e| Error::arrow(&self.component, e))?;
            }
            StdoutFormat::Pretty => {
                let table = arrow::util::pretty::pretty_format_batches(std::slice::from_ref(&batch.data))
                    .map_err(|e| Error::arrow(&self.component, e))?;
                writeln!(out, "{table}").ok();
            }
        }
        super::blocking(|| {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out).and_then(|_| stdout.flush())
        })
        .map_err(|e| Error::io("cannot write to", "stdout", e))
    }

    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
