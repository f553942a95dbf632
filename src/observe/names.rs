//! Every metric name sluice exports, in one place. Labels: `pipeline`, `component` (and `stage`).

pub const RECEIVED_RECORDS_TOTAL: &str = "sluice_component_received_records_total";
pub const RECEIVED_BYTES_TOTAL: &str = "sluice_component_received_bytes_total";
pub const SENT_RECORDS_TOTAL: &str = "sluice_component_sent_records_total";
pub const SENT_BYTES_TOTAL: &str = "sluice_component_sent_bytes_total";
pub const ERRORS_TOTAL: &str = "sluice_component_errors_total";
pub const DEAD_LETTER_RECORDS_TOTAL: &str = "sluice_dead_letter_records_total";
pub const BATCH_DURATION_SECONDS: &str = "sluice_component_batch_duration_seconds";
pub const SINK_BUSY_MICROSECONDS_TOTAL: &str = "sluice_sink_busy_microseconds_total";
pub const SINK_FILES_WRITTEN_TOTAL: &str = "sluice_sink_files_written_total";
pub const COMMITS_TOTAL: &str = "sluice_commits_total";
pub const MEMORY_BUDGET_BYTES: &str = "sluice_memory_budget_bytes";
pub const MEMORY_USED_BYTES: &str = "sluice_memory_used_bytes";
pub const KAFKA_CONSUMED_RECORDS_TOTAL: &str = "sluice_kafka_consumed_records_total";
pub const KAFKA_CONSUMED_BYTES_TOTAL: &str = "sluice_kafka_consumed_bytes_total";
pub const KAFKA_COMMITTED_OFFSET: &str = "sluice_kafka_committed_offset";
pub const KAFKA_LAG_RECORDS: &str = "sluice_kafka_lag_records";
pub const KAFKA_LAG_SECONDS: &str = "sluice_kafka_lag_seconds";
pub const KAFKA_PAUSES_TOTAL: &str = "sluice_kafka_partition_pauses_total";
pub const KAFKA_COMMIT_ERRORS_TOTAL: &str = "sluice_kafka_commit_errors_total";
pub const KAFKA_PRODUCED_RECORDS_TOTAL: &str = "sluice_kafka_produced_records_total";
pub const KAFKA_DELIVERY_ERRORS_TOTAL: &str = "sluice_kafka_delivery_errors_total";
pub const S3_PARTS_UPLOADED_TOTAL: &str = "sluice_s3_parts_uploaded_total";
pub const S3_BYTES_UPLOADED_TOTAL: &str = "sluice_s3_bytes_uploaded_total";
pub const S3_SPILLED_BYTES_TOTAL: &str = "sluice_s3_spilled_bytes_total";
pub const S3_UPLOADS_ABORTED_TOTAL: &str = "sluice_s3_uploads_aborted_total";
pub const S3_OBJECTS_READ_TOTAL: &str = "sluice_s3_objects_read_total";
