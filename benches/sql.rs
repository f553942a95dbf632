//! The SQL transform per batch: a filter + projection and a per-batch aggregate over generated
//! orders, planned once and executed per 8192-record batch.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::batch::{Ack, Batch, ShardInfo, ShardKind};
use sluice::dead_letter::DeadLetter;
use sluice::observe::ComponentMetrics;
use sluice::source::generator::{generate, shape_schema, Shape};
use sluice::transform::sql::SqlTransform;
use sluice::transform::Transform;

const ROWS: u64 = 8192;

fn bench_sql(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let schema = shape_schema(Shape::Orders);
    let data = generate(Shape::Orders, &schema, 1, 0, ROWS);
    let bytes = data.get_array_memory_size() as u64;
    let shard =
        Arc::new(ShardInfo { source: "orders".into(), id: "gen-0".into(), kind: ShardKind::Sequence, epoch: None });
    let batch = Batch {
        data,
        shard: shard.clone(),
        first: 0,
        last: ROWS - 1,
        row_positions: None,
        ack: Ack::detached(shard),
        memory: None,
    };
    let metrics = ComponentMetrics::new("bench");
    let dl = DeadLetter::none();
    let queries = [
        ("filter_projection", "SELECT order_id, customer_id, amount * 1.2 AS gross, date_trunc('day', ts) AS dt FROM orders WHERE amount > 100 AND status <> 'cancelled'"),
        ("per_batch_aggregate", "SELECT country, count(*) AS n, sum(amount) AS total FROM orders GROUP BY country"),
    ];
    let mut g = c.benchmark_group("sql_transform");
    g.throughput(Throughput::Elements(ROWS));
    for (name, q) in queries {
        let mut t = rt.block_on(SqlTransform::new("bench", "orders", schema.clone(), q)).unwrap();
        g.bench_function(name, |b| b.iter(|| black_box(rt.block_on(t.process(batch.clone(), &dl, &metrics)).unwrap())));
    }
    g.finish();
    let mut g = c.benchmark_group("sql_transform_bytes");
    g.throughput(Throughput::Bytes(bytes));
    let mut t = rt.block_on(SqlTransform::new("bench", "orders", schema.clone(), queries[0].1)).unwrap();
    g.bench_function("filter_projection", |b| {
        b.iter(|| black_box(rt.block_on(t.process(batch.clone(), &dl, &metrics)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_sql);
criterion_main!(benches);
