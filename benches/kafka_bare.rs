//! The client-side limit for the Kafka benchmarks: a bare rdkafka consume loop that reads every
//! partition of a topic from offset 0 and touches each payload (no decoding), until it has seen
//! `BENCH_COUNT` messages. Run by benches/kafka.sh with the same librdkafka settings and the same
//! client layout as the sluice source: one consumer for the topic, each partition's messages split
//! off into a queue of their own (before it is assigned), each queue polled by its own thread.
//!
//! Env: BENCH_BROKERS, BENCH_TOPIC, BENCH_COUNT. Prints one JSON line: messages, bytes, wall seconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

fn main() {
    // `cargo test --all-targets` builds and starts bench targets too; this one only measures.
    let Ok(brokers) = std::env::var("BENCH_BROKERS") else {
        eprintln!("kafka_bare: set BENCH_BROKERS, BENCH_TOPIC and BENCH_COUNT (benches/kafka.sh does)");
        return;
    };
    let topic = std::env::var("BENCH_TOPIC").expect("BENCH_TOPIC");
    let count: u64 = std::env::var("BENCH_COUNT").expect("BENCH_COUNT").parse().expect("a number");
    let config = {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &brokers)
            .set("group.id", "bench-bare")
            .set("enable.auto.commit", "false")
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.wait.max.ms", "100");
        c
    };
    let consumer: Arc<BaseConsumer> = Arc::new(config.create().expect("consumer"));
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let queues: Vec<_> =
        parts.iter().map(|&p| consumer.split_partition_queue(&topic, p).expect("a partition queue")).collect();
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).expect("tpl");
    }
    let seen = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    consumer.incremental_assign(&tpl).expect("assign");
    let threads: Vec<_> = queues
        .into_iter()
        .map(|queue| {
            let (seen, bytes) = (seen.clone(), bytes.clone());
            std::thread::spawn(move || {
                let mut checksum = 0u64;
                while seen.load(Ordering::Relaxed) < count {
                    if let Some(Ok(m)) = queue.poll(Duration::from_millis(50)) {
                        let p = m.payload().unwrap_or_default();
                        checksum = checksum.wrapping_add(p.first().copied().unwrap_or(0) as u64);
                        bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                checksum
            })
        })
        .collect();
    // The main queue still has to be served (errors, callbacks); no messages arrive on it.
    while seen.load(Ordering::Relaxed) < count {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            panic!("a message on the main queue: {}/{} @ {}", m.topic(), m.partition(), m.offset());
        }
    }
    let checksum: u64 = threads.into_iter().map(|t| t.join().expect("thread")).fold(0, u64::wrapping_add);
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{{\"messages\": {}, \"bytes\": {}, \"wall\": {wall:.3}, \"checksum\": {checksum}}}",
        seen.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed)
    );
}
