//! End-to-end tests: real pipelines over real files, output read back with the Parquet and Arrow
//! readers. One test binary (modules below) so the whole tree links once.

mod autoscale;
mod avro;
mod cli;
mod common;
mod coordinator;
mod coordinator_tls;
mod crash_loop;
mod disk_full;
mod fault_proxy;
mod faults;
mod file_sink;
mod fuzz_corpora;
mod garage;
mod kafka;
mod memory;
mod messy;
mod pg_cluster;
mod pipelines;
mod postgres;
mod s3;
mod security;
mod transform_errors;
