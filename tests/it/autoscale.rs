//! Autoscaling end to end: the `kube` scaler through the real `kube` client against an HTTP test
//! server that checks every request as the Kubernetes API documents the `scale` subresource, and
//! the `process` scaler starting and stopping real `sluice worker` processes over a real broker
//! into a real PostgreSQL.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::coordinator::{count, pg_pipeline, Cluster, TOKEN};
use crate::kafka::{create, produce, topic};
use crate::postgres::{psql, schema};

const KUBE_TOKEN: &str = "kube-test-token-not-a-secret";

/// A stand-in for the API server's `deployments/{name}/scale` endpoints (apps/v1, answering
/// autoscaling/v1 `Scale` objects). Every request that is not exactly what the API documents is
/// recorded as a violation and answered with a `Status` failure, as the API server would.
#[derive(Default)]
struct FakeApi {
    /// Deployment name → spec.replicas.
    replicas: Mutex<std::collections::HashMap<String, i32>>,
    patches: Mutex<Vec<(String, i32)>>,
    gets: Mutex<usize>,
    violations: Mutex<Vec<String>>,
}

fn status_failure(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()
        })),
    )
        .into_response()
}

fn scale_object(ns: &str, name: &str, replicas: i32) -> Value {
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": { "name": name, "namespace": ns, "uid": "8d5c1b43-1f2e-4a7b-9a55-3e1f0c2d4b6a", "resourceVersion": "4711", "creationTimestamp": "2026-12-01T00:00:00Z" },
        "spec": { "replicas": replicas },
        "status": { "replicas": replicas, "selector": format!("app.kubernetes.io/name=sluice,app.kubernetes.io/component=worker,app.kubernetes.io/instance={name}") }
    })
}

async fn scale_endpoint(
    State(api): State<Arc<FakeApi>>,
    method: Method,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let violation = |m: String| {
        api.violations.lock().unwrap().push(m.clone());
        m
    };
    if ns != "data" {
        violation(format!("{method} in namespace {ns}, not the one configured (data)"));
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {KUBE_TOKEN}")) {
        let m = violation(format!("{method} without the bearer token: {auth:?}"));
        return status_failure(StatusCode::UNAUTHORIZED, "Unauthorized", m);
    }
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !accept.is_empty() && !accept.contains("application/json") && !accept.contains("*/*") {
        let m = violation(format!("{method} with Accept {accept}"));
        return status_failure(StatusCode::NOT_ACCEPTABLE, "NotAcceptable", m);
    }
    if name == "forbidden-worker" {
        return status_failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("deployments.apps \"{name}\" is forbidden: User \"system:serviceaccount:{ns}:sluice\" cannot {} resource \"deployments/scale\" in API group \"apps\" in the namespace \"{ns}\"", method.as_str().to_lowercase()),
        );
    }
    let mut replicas = api.replicas.lock().unwrap();
    let Some(current) = replicas.get(&name).copied() else {
        return status_failure(StatusCode::NOT_FOUND, "NotFound", format!("deployments.apps \"{name}\" not found"));
    };
    match method {
        Method::GET => {
            if !body.is_empty() {
                violation(format!("GET with a body of {} bytes", body.len()));
            }
            *api.gets.lock().unwrap() += 1;
            Json(scale_object(&ns, &name, current)).into_response()
        }
        Method::PATCH => {
            let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
            if ct != "application/merge-patch+json" {
                let m = violation(format!("PATCH with Content-Type {ct:?}"));
                return status_failure(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", m);
            }
            if !query.as_deref().unwrap_or("").split('&').any(|kv| kv == "fieldManager=sluice") {
                violation(format!("PATCH without fieldManager=sluice: {query:?}"));
            }
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    let m = violation(format!("PATCH body is not JSON: {e}"));
                    return status_failure(StatusCode::BAD_REQUEST, "BadRequest", m);
                }
            };
            // Only spec.replicas, and nothing else, may be patched.
            let Some(n) = patch.pointer("/spec/replicas").and_then(Value::as_i64) else {
                let m = violation(format!("PATCH body without spec.replicas: {patch}"));
                return status_failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m);
            };
            if patch != json!({ "spec": { "replicas": n } }) {
                violation(format!("PATCH touches more than spec.replicas: {patch}"));
            }
            replicas.insert(name.clone(), n as i32);
            api.patches.lock().unwrap().push((name.clone(), n as i32));
            Json(scale_object(&ns, &name, n as i32)).into_response()
        }
        m => {
            let m = violation(format!("unexpected method {m}"));
            status_failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", m)
        }
    }
}

/// Serves the fake API on 127.0.0.1 from a thread of its own; returns its URL.
fn serve_fake_api(api: Arc<FakeApi>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let router = axum::Router::new()
                .route("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", axum::routing::any(scale_endpoint))
                .fallback({
                    let api = api.clone();
                    move |method: Method, uri: axum::http::Uri| {
                        let api = api.clone();
                        async move {
                            api.violations.lock().unwrap().push(format!("{method} {uri}: not the scale subresource"));
                            status_failure(
                                StatusCode::NOT_FOUND,
                                "NotFound",
                                format!("the server could not find {uri}"),
                            )
                        }
                    }
                })
                .with_state(api);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
    });
    url
}

#[test]
fn the_kube_scaler_reads_and_patches_the_worker_deployments_scale() {
    use sluice::autoscale::scaler::{KubeScaler, Scaler};
    let api = Arc::new(FakeApi::default());
    api.replicas.lock().unwrap().insert("sluice-worker".into(), 1);
    let url = serve_fake_api(api.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut config = kube::Config::new(url.parse().unwrap());
        config.auth_info.token = Some(KUBE_TOKEN.to_string().into());
        let scaler = KubeScaler::from_config(config.clone(), "sluice-worker", Some("data")).unwrap();
        assert_eq!(scaler.current().await.unwrap(), Some(1));
        scaler.scale(3).await.unwrap();
        assert_eq!(scaler.current().await.unwrap(), Some(3));
        // RBAC refusing the patch: the error names the Deployment, the namespace and the reason.
        let refused = KubeScaler::from_config(config.clone(), "forbidden-worker", Some("data")).unwrap();
        let e = refused.scale(2).await.unwrap_err().to_string();
        assert!(e.contains("deployments/forbidden-worker scale in namespace data") && e.contains("forbidden"), "{e}");
        let missing = KubeScaler::from_config(config, "no-such-worker", Some("data")).unwrap();
        let e = missing.current().await.unwrap_err().to_string();
        assert!(e.contains("no-such-worker") && e.contains("not found"), "{e}");
        assert!(!e.contains(KUBE_TOKEN));
    });
    assert_eq!(*api.patches.lock().unwrap(), vec![("sluice-worker".to_string(), 3)]);
    assert_eq!(*api.gets.lock().unwrap(), 2, "two reads of sluice-worker (the missing one is answered 404)");
    assert!(api.violations.lock().unwrap().is_empty(), "{:?}", api.violations.lock().unwrap());
}

#[test]
fn the_coordinator_scales_the_deployment_through_a_kubeconfig_and_explains_why() {
    let api = Arc::new(FakeApi::default());
    api.replicas.lock().unwrap().insert("orders-worker".into(), 0);
    let url = serve_fake_api(api.clone());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\nusers:\n- name: sluice\n  user:\n    token: {KUBE_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: sluice\n    namespace: data\ncurrent-context: test\n"
        ),
    )
    .unwrap();
    // Three input files: three shards, no input or lag the policy could see, so it asks for
    // --min-replicas.
    let data = dir.path().join("in");
    std::fs::create_dir(&data).unwrap();
    for i in 0..3 {
        std::fs::write(data.join(format!("{i}.ndjson")), "{\"id\": 1}\n").unwrap();
    }
    let pipeline = format!(
        r#"
[pipeline]
name = "kube-scaled"

[sources.orders]
type = "file"
path = "{}/*.ndjson"
format = {{ type = "json" }}
schema = {{ id = "bigint" }}

[sinks.out]
type = "blackhole"
inputs = ["orders"]
"#,
        data.display()
    );
    let cluster = Cluster::with_args(
        dir.path(),
        &pipeline,
        &["--scaler", "kube", "--kube-deployment", "orders-worker", "--min-replicas", "2", "--scale-interval", "1s"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let start = Instant::now();
    while api.patches.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "no PATCH within 60 s: {}", cluster.logs("coordinator"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api.patches.lock().unwrap()[0], ("orders-worker".to_string(), 2));
    // The decision is explained in the status (JSON and table) and in the log.
    let status = loop {
        let s = cluster.status().unwrap_or_default();
        if s["autoscale"]["desired"] == 2 {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["autoscale"]["scaler"], "kube");
    let reason = status["autoscale"]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("no input and no lag"), "{reason}");
    let table = crate::common::sluice()
        .env("SLUICE_COORDINATOR_TOKEN", TOKEN)
        .args(["status", "--coordinator", &cluster.url])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("autoscale (kube): 2 -> 2 replicas") || table.contains("autoscale (kube): 0 -> 2 replicas"),
        "{table}"
    );
    let log = cluster.logs("coordinator");
    assert!(log.contains("autoscale:") && log.contains("scale up 0 -> 2"), "{log}");
    assert!(!log.contains(KUBE_TOKEN), "the Kubernetes token is never logged");
    assert!(api.violations.lock().unwrap().is_empty(), "{:?}", api.violations.lock().unwrap());
}

/// A backlog appears, the coordinator starts more worker processes, the backlog drains, and after
/// the stabilization period they are stopped again: one way up, one way down, and every record
/// is in the table exactly once.
#[test]
fn the_process_scaler_adds_workers_for_a_backlog_and_removes_them_once_it_drained() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("autoscale");
    let partitions = 4;
    create(&t, partitions);
    let n = 300_000;
    produce(&t, partitions, n, 1, 0, dir.path());
    let table = format!("{}.orders", schema("autoscale"));
    let mut cluster = Cluster::with_args(
        dir.path(),
        &pg_pipeline("autoscale-process", &t, &table),
        &[
            "--scaler",
            "process",
            "--min-replicas",
            "1",
            "--max-replicas",
            "4",
            // Plan for 5% of the measured capacity: the backlog asks for several workers
            // however fast this machine is today.
            "--target-utilization",
            "0.05",
            "--catch-up-window",
            "2s",
            "--scale-window",
            "3s",
            "--scale-interval",
            "1s",
            "--scale-down-stabilization",
            "6s",
        ],
        &[],
    );
    let start = Instant::now();
    let mut seen: Vec<u32> = Vec::new();
    let mut reasons = BTreeSet::new();
    loop {
        if let Some(s) = cluster.status() {
            if let Some(d) = s["autoscale"]["desired"].as_u64() {
                if seen.last() != Some(&(d as u32)) {
                    seen.push(d as u32);
                    reasons.insert(s["autoscale"]["reason"].as_str().unwrap_or("").to_string());
                }
            }
            let done = count(&table) >= n as i64;
            if done && seen.last() == Some(&1) && seen.iter().any(|r| *r > 1) {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "replicas asked for: {seen:?}, rows {} of {n}\n{reasons:#?}\n{}",
            count(&table),
            cluster.logs("coordinator")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("replicas asked for: {seen:?} in {:?}\n{reasons:#?}", start.elapsed());
    // Up, then down, never back up: no oscillation.
    let peak = seen.iter().position(|r| *r == *seen.iter().max().unwrap()).unwrap();
    assert!(seen[..=peak].windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen[peak..].windows(2).all(|w| w[0] > w[1]), "{seen:?}");
    assert!(seen.iter().max().unwrap() > &1, "{seen:?}");
    let distinct: i64 = psql(&format!("SELECT count(DISTINCT order_id) FROM {table}")).parse().unwrap();
    let in_topic = crate::kafka::topic_records(&t);
    assert_eq!(
        (count(&table), distinct),
        (in_topic, n as i64),
        "every record of the topic once ({} written twice by the producer's retries)",
        in_topic - n as i64
    );
    // The status says 1 as soon as the scale-down is decided; the stopped workers then drain and
    // leave, which takes a moment.
    let stopped = seen.iter().max().unwrap().saturating_sub(1) as usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.logs("coordinator").matches("worker left").count() < stopped && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = cluster.logs("coordinator");
    assert!(log.contains("started a worker process") && log.contains("stopping a worker process"), "{log}");
    // Every change of the count, from the coordinator's log (the status polls could miss one):
    // up, then down, never back up.
    let changes: Vec<u32> = log
        .lines()
        .filter(|l| l.contains("autoscale:"))
        .filter_map(|l| l.split(" to=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let top = changes.iter().position(|r| r == changes.iter().max().unwrap()).unwrap();
    assert!(changes[..=top].windows(2).all(|w| w[0] < w[1]), "{changes:?}");
    assert!(changes[top..].windows(2).all(|w| w[0] > w[1]) && changes.last() == Some(&1), "{changes:?}");
    // The stopped workers drained and left instead of timing out.
    assert!(log.matches("worker left").count() >= stopped, "{log}");
    // Stopping the coordinator stops the worker it still runs.
    assert!(cluster.stop_coordinator().success());
    let left = cluster.logs("coordinator");
    assert!(left.matches("worker left").count() > log.matches("worker left").count(), "{left}");
}
