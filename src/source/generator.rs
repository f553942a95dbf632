//! The `generator` source: deterministic synthetic events (`orders`, `clickstream`), built directly
//! as Arrow arrays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, Decimal128Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::Deserialize;

use super::{Produced, ShardContext, Source};
use crate::batch::{ShardInfo, ShardKind};
use crate::{Error, Result};

/// `[sources.ID] type = "generator"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Which events to generate.
    pub shape: Shape,
    /// Records to generate in all; without it the source runs until stopped.
    pub count: Option<u64>,
    /// Records per second in all shards together; without it, as fast as the pipeline goes.
    pub rate: Option<f64>,
    /// Seed: the same seed, shape and count always give the same records.
    #[serde(default)]
    pub seed: u64,
    /// Shards to split the sequence into (read in parallel).
    #[serde(default = "default_shards")]
    pub shards: u32,
}

fn default_shards() -> u32 {
    1
}

/// Event shapes the generator knows.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `order_id, customer_id, amount decimal(12,2), currency, country, status, quantity, ts`.
    Orders,
    /// `event_id, user_id, session_id, event_type, url, referrer, duration_ms, ts`.
    Clickstream,
}

/// 2026-01-01T00:00:00Z in microseconds.
const EPOCH_2026_MICROS: i64 = 1_767_225_600_000_000;
const COUNTRIES: [&str; 12] = ["DE", "FR", "US", "GB", "JP", "BR", "IN", "ES", "IT", "NL", "SE", "CH"];
const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];
const STATUSES: [&str; 4] = ["created", "paid", "shipped", "cancelled"];
const EVENTS: [&str; 4] = ["view", "click", "add_to_cart", "purchase"];
const PAGES: [&str; 6] = ["/", "/search", "/product/42", "/cart", "/checkout", "/account/Zoë"];
const REFERRERS: [&str; 3] = ["https://example.com/", "https://news.example.org/a?b=1", "https://søk.example.no/"];

/// Deterministic synthetic events.
pub struct GeneratorSource {
    id: String,
    config: GeneratorConfig,
    schema: SchemaRef,
}

impl GeneratorSource {
    /// # Errors
    /// `(key, message)` for a setting out of range.
    pub fn new(id: &str, config: GeneratorConfig) -> Result<Self, (&'static str, String)> {
        if config.shards == 0 {
            return Err(("shards", "must be at least 1".into()));
        }
        if let Some(rate) = config.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(("rate", format!("must be a positive number of records per second, not {rate}")));
            }
        }
        Ok(GeneratorSource { id: id.to_string(), schema: shape_schema(config.shape), config })
    }
}

/// The schema of `shape`.
pub fn shape_schema(shape: Shape) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Arc::new(Schema::new(match shape {
        Shape::Orders => vec![
            Field::new("order_id", DataType::Int64, false),
            Field::new("customer_id", DataType::Utf8, false),
            Field::new("amount", DataType::Decimal128(12, 2), true),
            Field::new("currency", DataType::Utf8, false),
            Field::new("country", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("quantity", DataType::Int32, false),
            Field::new("ts", ts, false),
        ],
        Shape::Clickstream => vec![
            Field::new("event_id", DataType::Int64, false),
            Field::new("user_id", DataType::Int64, false),
            Field::new("session_id", DataType::Utf8, false),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("url", DataType::Utf8, false),
            Field::new("referrer", DataType::Utf8, true),
            Field::new("duration_ms", DataType::Int32, false),
            Field::new("ts", ts, false),
        ],
    }))
}

/// SplitMix64: a well-mixed 64-bit value for each (seed, index).
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generates records `start..end` of `shape`.
pub fn generate(shape: Shape, schema: &SchemaRef, seed: u64, start: u64, end: u64) -> RecordBatch {
    let n = (end - start) as usize;
    let columns: Vec<ArrayRef> = match shape {
        Shape::Orders => {
            let mut id = Int64Builder::with_capacity(n);
            let mut customer = StringBuilder::with_capacity(n, n * 7);
            let mut amount = Decimal128Builder::with_capacity(n);
            let mut currency = StringBuilder::with_capacity(n, n * 3);
            let mut country = StringBuilder::with_capacity(n, n * 2);
            let mut status = StringBuilder::with_capacity(n, n * 8);
            let mut quantity = Int32Builder::with_capacity(n);
            let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
            let mut buf = String::with_capacity(8);
            for i in start..end {
                let h = mix(seed, i);
                id.append_value(i as i64 + 1);
                buf.clear();
                use std::fmt::Write;
                let _ = write!(buf, "C{:06}", h % 50_000);
                customer.append_value(&buf);
                if h % 200 == 7 {
                    amount.append_null();
                } else {
                    amount.append_value(((h >> 12) % 100_000) as i128 + 1);
                }
                currency.append_value(CURRENCIES[((h >> 32) % 4) as usize]);
                country.append_value(COUNTRIES[((h >> 36) % 12) as usize]);
                status.append_value(STATUSES[((h >> 40) % 4) as usize]);
                quantity.append_value(((h >> 44) % 9) as i32 + 1);
                ts.append_value(EPOCH_2026_MICROS + i as i64 * 1_000_000 + ((h >> 48) % 1_000_000) as i64);
            }
            vec![
                Arc::new(id.finish()),
                Arc::new(customer.finish()),
                Arc::new(amount.finish().with_precision_and_scale(12, 2).expect("12,2 is a valid decimal")),
                Arc::new(currency.finish()),
                Arc::new(country.finish()),
                Arc::new(status.finish()),
                Arc::new(quantity.finish()),
                Arc::new(ts.finish()),
            ]
        }
        Shape::Clickstream => {
            let mut id = Int64Builder::with_capacity(n);
            let mut user = Int64Builder::with_capacity(n);
            let mut session = StringBuilder::with_capacity(n, n * 16);
            let mut event = StringBuilder::with_capacity(n, n * 6);
            let mut url = StringBuilder::with_capacity(n, n * 10);
            let mut referrer = StringBuilder::with_capacity(n, n * 10);
            let mut duration = Int32Builder::with_capacity(n);
            let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
            let mut buf = String::with_capacity(16);
            for i in start..end {
                let h = mix(seed, i);
                let user_id = (h % 100_000) as i64;
                id.append_value(i as i64 + 1);
                user.append_value(user_id);
                buf.clear();
                use std::fmt::Write;
                let _ = write!(buf, "{user_id:x}-{:x}", (i / 64) % 4096);
                session.append_value(&buf);
                event.append_value(EVENTS[((h >> 20) % 4) as usize]);
                url.append_value(PAGES[((h >> 24) % 6) as usize]);
                if (h >> 28) % 10 < 3 {
                    referrer.append_null();
                } else {
                    referrer.append_value(REFERRERS[((h >> 32) % 3) as usize]);
                }
                duration.append_value(((h >> 36) % 30_000) as i32);
                ts.append_value(EPOCH_2026_MICROS + i as i64 * 1_000);
            }
            vec![
                Arc::new(id.finish()),
                Arc::new(user.finish()),
                Arc::new(session.finish()),
                Arc::new(event.finish()),
                Arc::new(url.finish()),
                Arc::new(referrer.finish()),
                Arc::new(duration.finish()),
                Arc::new(ts.finish()),
            ]
        }
    };
    RecordBatch::try_new(schema.clone(), columns).expect("generated columns match the shape's schema")
}

#[async_trait]
impl Source for GeneratorSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        Ok((0..self.config.shards)
            .map(|i| {
                Arc::new(ShardInfo {
                    source: self.id.clone(),
                    id: format!("gen-{i}"),
                    kind: ShardKind::Sequence,
                    epoch: None,
                })
            })
            .collect())
    }

    async fn read_shard(&self, ctx: ShardContext) -> Result<()> {
        let shards = u64::from(self.config.shards);
        let index: u64 = ctx.shard.id.trim_start_matches("gen-").parse().map_err(|_| Error::Internal {
            component: self.id.clone(),
            message: format!("unknown generator shard `{}`", ctx.shard.id),
        })?;
        // Shard i of n owns the contiguous range [i·count/n, (i+1)·count/n); without a count, it
        // owns every n-th block of `batch` records.
        let shard_rate = self.config.rate.map(|r| r / shards as f64);
        let batch = match shard_rate {
            Some(r) => (r / 10.0).clamp(1.0, ctx.batch_size as f64) as u64,
            None => ctx.batch_size as u64,
        };
        let (mut next, end) = match self.config.count {
            Some(c) => (index * c / shards, Some((index + 1) * c / shards)),
            None => (index * batch, None),
        };
        let started = Instant::now();
        let mut produced = 0u64;
        let (shape, schema, seed) = (self.config.shape, self.schema.clone(), self.config.seed);
        loop {
            if ctx.cancel.is_cancelled() {
                return Ok(());
            }
            let stop = match end {
                Some(e) if next >= e => break,
                Some(e) => e.min(next + batch),
                None => next + batch,
            };
            if let Some(rate) = shard_rate {
                let due = started + Duration::from_secs_f64(produced as f64 / rate);
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = ctx.cancel.cancelled() => return Ok(()),
                }
            }
            let schema2 = schema.clone();
            let data = tokio::task::spawn_blocking(move || generate(shape, &schema2, seed, next, stop))
                .await
                .map_err(|e| Error::Internal { component: self.id.clone(), message: e.to_string() })?;
            let raw_bytes = data.get_array_memory_size();
            let rows = stop - next;
            ctx.emit(Produced {
                data,
                positions: (next..stop).collect(),
                bad: Vec::new(),
                first: next,
                last: stop - 1,
                raw_bytes,
            })
            .await?;
            produced += rows;
            next = if end.is_some() { stop } else { next + batch * shards };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    #[test]
    fn same_seed_same_records_and_any_split_agrees() {
        let s = shape_schema(Shape::Orders);
        let whole = generate(Shape::Orders, &s, 7, 0, 100);
        let a = generate(Shape::Orders, &s, 7, 0, 40);
        let b = generate(Shape::Orders, &s, 7, 40, 100);
        assert_eq!(whole.slice(0, 40), a);
        assert_eq!(whole.slice(40, 60), b);
        assert_ne!(generate(Shape::Orders, &s, 8, 0, 100), whole, "another seed, other values");
        let ids = whole.column(0).as_primitive::<Int64Type>();
        assert_eq!((ids.value(0), ids.value(99)), (1, 100));
    }

    #[test]
    fn clickstream_has_nullable_referrers() {
        let s = shape_schema(Shape::Clickstream);
        let b = generate(Shape::Clickstream, &s, 1, 0, 1000);
        let nulls = b.column_by_name("referrer").unwrap().null_count();
        assert!((200..400).contains(&nulls), "about 30% null, got {nulls}");
    }

    #[test]
    fn rejects_zero_shards_and_bad_rates() {
        let c = GeneratorConfig { shape: Shape::Orders, count: None, rate: Some(-1.0), seed: 0, shards: 1 };
        assert_eq!(GeneratorSource::new("g", c.clone()).err().unwrap().0, "rate");
        assert_eq!(
            GeneratorSource::new("g", GeneratorConfig { rate: None, shards: 0, ..c }).err().unwrap().0,
            "shards"
        );
    }
}
