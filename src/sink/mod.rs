//! Sinks: the [`Sink`] trait, the shared rolling file writer, and the built-in sinks.

pub mod blackhole;
pub mod file;
pub mod kafka;
pub mod postgres;
pub mod s3;
pub mod stdout;
pub mod writer;

use async_trait::async_trait;

use crate::batch::Batch;
use crate::Result;

/// Writes batches somewhere durable and drops each batch's [`Ack`](crate::batch::Ack) once its
/// records are durable there (not before).
#[async_trait]
pub trait Sink: Send {
    /// Gives the sink the pipeline's dead-letter path, for records the destination refuses one by
    /// one (the Kafka sink's failed deliveries). Sinks that fail as a whole ignore it.
    fn set_dead_letter(&mut self, _dead_letter: crate::dead_letter::DeadLetter) {}

    /// Takes one batch. May buffer it (holding its ack) until a file or part is complete.
    ///
    /// # Errors
    /// When the destination fails; the pipeline stops and nothing past the failure is committed.
    async fn write(&mut self, batch: Batch) -> Result<()>;

    /// Called every [`TICK`]: time-based work such as `rotate.max_age` and `flush_interval`.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    async fn tick(&mut self) -> Result<()> {
        Ok(())
    }

    /// Makes everything buffered durable (end of input, or a graceful stop).
    ///
    /// # Errors
    /// As [`write`](Self::write).
    async fn finish(&mut self) -> Result<()>;

    /// Discards buffered data after a failure; nothing half-written may stay visible.
    async fn abort(&mut self) {}
}

/// How often the runtime calls [`Sink::tick`]. Time-based limits (`rotate.max_age`, the postgres
/// sink's `flush_interval`) are overshot by at most this (at one second, by up to a second).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs blocking destination I/O without stalling other tasks of a multi-threaded runtime.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
