//! The client-side limit for the Kafka benchmarks: a bare rdkafka consume loop that reads every
//! partition of a topic from offset 0 and touches each payload (no decoding), until it has seen
//! `BENCH_COUNT` messages. Run by benches/kafka.sh with the same librdkafka settings and the same
//! client layout as the sluice source: one consumer for the topic, each partition's messages split
//! off into a queue of their own (before it is assigned), each queue read by its own thread a
//! batch at a time (`rd_kafka_consume_batch_queue`, as the source reads them).
//!
//! Env: BENCH_BROKERS, BENCH_TOPIC, BENCH_COUNT. Prints one JSON line: messages, bytes, wall seconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

/// Most messages one read takes.
const BATCH: usize = 1000;

/// A native partition queue, moved to the thread that reads it.
struct Queue(*mut rdsys::rd_kafka_queue_t);
// SAFETY: librdkafka queues may be used from any thread.
unsafe impl Send for Queue {}

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
    // The partitions' queues, split off the consumer (rdkafka's split_partition_queue, with the
    // native queue kept for the batch read rdkafka does not offer).
    let queues: Vec<Queue> = parts
        .iter()
        .map(|&p| {
            let t = std::ffi::CString::new(topic.as_str()).expect("a topic name");
            // SAFETY: the client outlives the queues (joined below); the topic is a C string.
            let q = unsafe { rdsys::rd_kafka_queue_get_partition(consumer.client().native_ptr(), t.as_ptr(), p) };
            assert!(!q.is_null(), "a partition queue");
            // SAFETY: `q` is valid; a null destination unforwards it.
            unsafe { rdsys::rd_kafka_queue_forward(q, std::ptr::null_mut()) };
            Queue(q)
        })
        .collect();
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
                let queue = queue;
                let mut checksum = 0u64;
                let mut batch: Vec<*mut rdsys::rd_kafka_message_t> = Vec::with_capacity(BATCH);
                while seen.load(Ordering::Relaxed) < count {
                    // SAFETY: `batch` has room for BATCH pointers; librdkafka fills the first `n`.
                    let n = unsafe { rdsys::rd_kafka_consume_batch_queue(queue.0, 50, batch.as_mut_ptr(), BATCH) };
                    // SAFETY: the first `n` slots were written.
                    unsafe { batch.set_len(n.max(0) as usize) };
                    let (mut messages, mut size) = (0, 0);
                    for &m in &batch {
                        // SAFETY: each message is valid until destroyed, once, right after.
                        unsafe {
                            let m_ref = &*m;
                            if m_ref.err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                                && !m_ref.payload.is_null()
                            {
                                let p = std::slice::from_raw_parts(m_ref.payload as *const u8, m_ref.len);
                                checksum = checksum.wrapping_add(p.first().copied().unwrap_or(0) as u64);
                                size += p.len() as u64;
                                messages += 1;
                            }
                            rdsys::rd_kafka_message_destroy(m);
                        }
                    }
                    batch.clear();
                    bytes.fetch_add(size, Ordering::Relaxed);
                    seen.fetch_add(messages, Ordering::Relaxed);
                }
                // SAFETY: the queue is destroyed once, before its client.
                unsafe { rdsys::rd_kafka_queue_destroy(queue.0) };
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
