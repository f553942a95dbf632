//! JSON → Arrow and CSV → Arrow decoding throughput (records/s and MB/s), clean and with 1% bad
//! records (the row-isolation path). JSON is measured with its fast path and, in the same run, with
//! arrow-json alone (`arrow_only_*`), the baseline the fast path replaces.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use indexmap::IndexMap;
use sluice::config::types::schema_from_columns;
use sluice::format::csv::{CsvDecoder, CsvOptions};
use sluice::format::decimal_guard::might_be_unsafe;
use sluice::format::json::JsonDecoder;
use sluice::format::{decode_chunk, LineChunk};

const ROWS: usize = 8192;

fn schema() -> arrow::datatypes::SchemaRef {
    let cols: IndexMap<String, String> = [
        ("order_id", "bigint not null"),
        ("customer_id", "varchar not null"),
        ("amount", "decimal(12,2)"),
        ("currency", "varchar"),
        ("country", "varchar"),
        ("status", "varchar"),
        ("quantity", "int"),
        ("ts", "timestamp"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    schema_from_columns(&cols).unwrap()
}

/// ~250-byte order events, as the benchmark harness produces them.
fn json_line(i: usize, bad: bool) -> String {
    let amount = if bad { "\"abc\"".to_string() } else { format!("\"{}.{:02}\"", i % 5000, i % 100) };
    format!(
        r#"{{"order_id": {i}, "customer_id": "C{:06}", "amount": {amount}, "currency": "EUR", "country": "DE", "status": "paid", "quantity": {}, "ts": "2026-01-01T00:{:02}:{:02}", "note": "padding to make the record about two hundred and fifty bytes long"}}"#,
        i % 50_000,
        i % 9 + 1,
        (i / 60) % 60,
        i % 60
    )
}

fn chunk(lines: impl Iterator<Item = String>) -> LineChunk {
    let mut c = LineChunk::new();
    for (i, l) in lines.enumerate() {
        c.push(l.as_bytes(), i as u64 + 1);
    }
    c
}

fn bench_json(c: &mut Criterion) {
    let decoder = JsonDecoder::new(schema());
    let arrow_only = JsonDecoder::arrow_only(schema());
    assert!(decoder.has_fast_path());
    let clean = chunk((0..ROWS).map(|i| json_line(i, false)));
    let dirty = chunk((0..ROWS).map(|i| json_line(i, i % 100 == 37)));
    let mut g = c.benchmark_group("json_decode");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("clean_8192_records", |b| b.iter(|| black_box(decode_chunk(&decoder, &clean).unwrap())));
    g.bench_function("arrow_only_clean_8192_records", |b| {
        b.iter(|| black_box(decode_chunk(&arrow_only, &clean).unwrap()))
    });
    g.bench_function("one_percent_bad_8192_records", |b| b.iter(|| black_box(decode_chunk(&decoder, &dirty).unwrap())));
    g.bench_function("arrow_only_one_percent_bad_8192_records", |b| {
        b.iter(|| black_box(decode_chunk(&arrow_only, &dirty).unwrap()))
    });
    // The decimal guard: its scan alone over the clean chunk (what every chunk with a decimal
    // column pays), and a chunk whose UUIDs (`550e8400-…`) trip the scan into its second decode.
    g.bench_function("decimal_guard_scan_8192_records", |b| b.iter(|| black_box(might_be_unsafe(&clean.buf, true))));
    let uuids =
        chunk((0..ROWS).map(|i| {
            json_line(i, false).replacen('{', &format!("{{\"uuid\": \"550e8400-e29b-41d4-a716-{i:012}\", "), 1)
        }));
    assert!(might_be_unsafe(&uuids.buf, true) && !might_be_unsafe(&clean.buf, true));
    g.bench_function("clean_with_uuids_8192_records", |b| {
        b.iter(|| black_box(decode_chunk(&decoder, &uuids).unwrap()))
    });
    g.finish();
    let mut g = c.benchmark_group("json_decode_bytes");
    g.throughput(Throughput::Bytes(clean.buf.len() as u64));
    g.bench_function("clean_8192_records", |b| b.iter(|| black_box(decode_chunk(&decoder, &clean).unwrap())));
    g.bench_function("arrow_only_clean_8192_records", |b| {
        b.iter(|| black_box(decode_chunk(&arrow_only, &clean).unwrap()))
    });
    g.finish();
}

fn bench_csv(c: &mut Criterion) {
    let decoder = CsvDecoder::new(schema(), &CsvOptions::default());
    let lines = (0..ROWS).map(|i| {
        format!(
            "{i},C{:06},{}.{:02},EUR,DE,paid,{},2026-01-01T00:00:{:02}",
            i % 50_000,
            i % 5000,
            i % 100,
            i % 9 + 1,
            i % 60
        )
    });
    let clean = chunk(lines);
    let mut g = c.benchmark_group("csv_decode");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("clean_8192_records", |b| b.iter(|| black_box(decode_chunk(&decoder, &clean).unwrap())));
    g.finish();
}

criterion_group!(benches, bench_json, bench_csv);
criterion_main!(benches);
