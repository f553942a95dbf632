//! The `sluice` command line: run and validate pipelines.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use sluice::config::{self, ConfigError};
use sluice::observe::{self, human_bytes, Health};
use sluice::runtime::{self, RunOptions, RunSummary};

/// Exit code: success.
const EXIT_OK: u8 = 0;
/// Exit code: the pipeline file is invalid (nothing ran).
const EXIT_CONFIG: u8 = 1;
/// Exit code: the pipeline failed while running.
const EXIT_RUNTIME: u8 = 3;
/// Exit code: stopped at once by a second SIGINT/SIGTERM.
const EXIT_FORCED: u8 = 130;

/// sluice: a streaming ETL worker runtime. Moves records between sources (files, generator) and
/// sinks (Parquet/JSON/CSV files, stdout) as Apache Arrow batches, transformed with DataFusion SQL.
///
/// Exit codes: 0 success; 1 invalid pipeline (nothing ran); 2 bad command line; 3 the pipeline
/// failed while running; 130 stopped at once by a second SIGINT/SIGTERM.
/// Log levels come from RUST_LOG (e.g. RUST_LOG=sluice=debug); the default is info.
#[derive(Parser, Debug)]
#[command(name = "sluice", version, about, long_about)]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// HTTPS for the coordinator (README: "Worker ↔ coordinator security").
#[derive(clap::Args, Debug)]
struct ServerTlsArgs {
    /// Serve HTTPS with this PEM certificate (chain); needs --tls-key.
    #[arg(long, env = "SLUICE_COORDINATOR_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_COORDINATOR_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse any caller without a client certificate signed by this PEM CA.
    #[arg(long, env = "SLUICE_COORDINATOR_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
}

/// TLS settings for reaching an https:// coordinator.
#[derive(clap::Args, Debug)]
struct ClientTlsArgs {
    /// The PEM CA that signed the coordinator's certificate (default: the system's roots).
    #[arg(long, env = "SLUICE_COORDINATOR_CA")]
    coordinator_ca: Option<PathBuf>,
    /// A PEM client certificate, for a coordinator that requires one (mutual TLS); needs --tls-key.
    #[arg(long, env = "SLUICE_WORKER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_WORKER_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    fn settings(self) -> sluice::coordinator::tls::ClientTls {
        sluice::coordinator::tls::ClientTls { ca: self.coordinator_ca, cert: self.tls_cert, key: self.tls_key }
    }
}

/// The coordinator's autoscaler (README: "Autoscaling").
#[derive(clap::Args, Debug)]
struct AutoscaleArgs {
    /// What applies the replica count: `kube` patches the worker Deployment's scale, `process`
    /// starts and stops local `sluice worker` processes, `none` only publishes
    /// sluice_desired_replicas (for KEDA or an HPA).
    #[arg(long, value_enum, default_value_t = ScalerKind::None, env = "SLUICE_SCALER")]
    scaler: ScalerKind,
    #[arg(long, default_value_t = 1)]
    min_replicas: u32,
    #[arg(long, default_value_t = 10)]
    max_replicas: u32,
    /// A backlog should be worked off within this time (the lag term of the demand).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    catch_up_window: std::time::Duration,
    /// Share of a replica's measured rate to plan for, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    target_utilization: f64,
    /// No scale-down until the last change is this old, and never below a recommendation of
    /// this period.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    scale_down_stabilization: std::time::Duration,
    /// At most max(this, 2 × current) replicas are added at once.
    #[arg(long, default_value_t = 4)]
    max_step_up: u32,
    /// Scale to zero replicas after --idle-period without input or lag.
    #[arg(long)]
    scale_to_zero: bool,
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    idle_period: std::time::Duration,
    /// The inputs (rates, lag) are averaged over this window.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    scale_window: std::time::Duration,
    /// How often a decision is made.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    scale_interval: std::time::Duration,
    /// `--scaler kube`: the worker Deployment.
    #[arg(long, env = "SLUICE_KUBE_DEPLOYMENT")]
    kube_deployment: Option<String>,
    /// `--scaler kube`: its namespace (default: the service account's, or the kubeconfig's).
    #[arg(long, env = "SLUICE_KUBE_NAMESPACE")]
    kube_namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum ScalerKind {
    Kube,
    Process,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline until its sources are exhausted, or until SIGINT/SIGTERM (stop reading,
    /// flush, commit, exit 0; a second signal exits at once with 130).
    Run {
        /// The pipeline TOML file.
        pipeline: PathBuf,
        /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at this address
        /// (e.g. 0.0.0.0:9090).
        #[arg(long, env = "SLUICE_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Never print the live progress line (it is shown only when stderr is a terminal).
        #[arg(long)]
        no_progress: bool,
        /// Worker name used as the `worker` metric label (default: the host name).
        #[arg(long, env = "SLUICE_WORKER")]
        worker: Option<String>,
        /// Read each streaming source (Kafka) up to the positions that were its end when the run
        /// started, then flush, commit and exit 0 (a backfill; "available now").
        #[arg(long)]
        bounded: bool,
    },
    /// Set the committed positions of the pipeline's Kafka sources (their consumer groups) to
    /// `--to`, so that the next run starts there. Run it while the pipeline is stopped.
    Reset {
        /// The pipeline TOML file.
        pipeline: PathBuf,
        /// `earliest`, `latest`, or an RFC 3339 time (the first record at or after it).
        #[arg(long)]
        to: String,
        /// Only this source (default: every Kafka source of the pipeline).
        #[arg(long)]
        source: Option<String>,
    },
    /// Serve the coordinator: workers register and heartbeat here, and the sources' shards are
    /// spread over them (balanced, sticky), handed over safely and fenced by epochs. Calls need
    /// the bearer token in SLUICE_COORDINATOR_TOKEN. Serves /healthz, /readyz and /metrics too.
    Coordinator {
        /// The pipeline TOML file (the same one the workers run).
        #[arg(long)]
        pipeline: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:7070.
        #[arg(long, env = "SLUICE_COORDINATOR_LISTEN", default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// A worker that sends no heartbeat for this long is gone and its shards move.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        lease_timeout: std::time::Duration,
        /// How often workers send heartbeats.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        heartbeat_interval: std::time::Duration,
        /// How often shards (new partitions) and lag are read from the sources.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        refresh_interval: std::time::Duration,
        #[command(flatten)]
        autoscale: AutoscaleArgs,
        #[command(flatten)]
        tls: ServerTlsArgs,
    },
    /// Run as a worker: register with the coordinator and run the shards it assigns. SIGTERM
    /// drains them (flush, commit), hands them back and exits 0.
    Worker {
        /// The pipeline TOML file (the same one the coordinator has).
        #[arg(long)]
        pipeline: PathBuf,
        /// The coordinator's URL, e.g. http://sluice-coordinator:7070.
        #[arg(long, env = "SLUICE_COORDINATOR_URL")]
        coordinator: String,
        /// Serve /metrics, /healthz and /readyz at this address.
        #[arg(long, env = "SLUICE_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Worker name (default: the host name, i.e. the pod name).
        #[arg(long, env = "SLUICE_WORKER")]
        worker: Option<String>,
        /// CPUs this worker may use, in millicores, for the busy share its heartbeats report
        /// (default: the CPUs the process sees, cgroup limits included; set it from the CPU
        /// request when there is no CPU limit, as the Helm chart does).
        #[arg(long, env = "SLUICE_CPU_MILLICORES", value_parser = clap::value_parser!(u32).range(1..))]
        cpu_millicores: Option<u32>,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
    /// Show the coordinator's workers and shards: owners, epochs, lag and rates.
    Status {
        /// The coordinator's URL.
        #[arg(long, env = "SLUICE_COORDINATOR_URL")]
        coordinator: String,
        /// Print the JSON of GET /v1/status instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
    /// Check a pipeline without running it: syntax, keys and value types, environment variables,
    /// the graph of inputs, schemas, and that every SQL query plans. Exit 0 when valid, 1 when not.
    Validate {
        /// The pipeline TOML file.
        pipeline: PathBuf,
    },
}

#[global_allocator]
static ALLOCATOR: sluice::alloc::SizeClasses = sluice::alloc::SizeClasses;

fn main() -> ExitCode {
    let cli = Cli::parse();
    limit_malloc_arenas();
    init_logging(cli.log_format);
    sluice::batch::install_panic_guard();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = rt.block_on(async {
        match cli.command {
            Command::Validate { pipeline } => validate(pipeline).await,
            Command::Reset { pipeline, to, source } => reset(pipeline, &to, source.as_deref()).await,
            Command::Run { pipeline, metrics_addr, no_progress, worker, bounded } => {
                run(pipeline, metrics_addr, !no_progress, worker, bounded).await
            }
            Command::Coordinator {
                pipeline,
                listen,
                lease_timeout,
                heartbeat_interval,
                refresh_interval,
                autoscale,
                tls,
            } => {
                let timing =
                    sluice::coordinator::server::Timing { lease_timeout, heartbeat_interval, refresh_interval };
                let tls = sluice::coordinator::tls::ServerTls {
                    cert: tls.tls_cert,
                    key: tls.tls_key,
                    client_ca: tls.tls_client_ca,
                };
                coordinator(pipeline, listen, timing, autoscale, tls, cli.log_format).await
            }
            Command::Worker { pipeline, coordinator, metrics_addr, worker, cpu_millicores, tls } => {
                let cpus = cpu_millicores.map(|m| f64::from(m) / 1000.0);
                worker_mode(pipeline, &coordinator, metrics_addr, worker, cpus, &tls.settings()).await
            }
            Command::Status { coordinator, json, tls } => status(&coordinator, json, &tls.settings()).await,
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

/// glibc's malloc gives every thread that allocates its own arena; with Tokio and blocking threads
/// the arenas fragment and RSS grows with the data moved (226 MiB instead of 63 MiB for 10M
/// records to Parquet, benches/results/memory.md) although live memory stays bounded. (mimalloc
/// and jemalloc were tried: no faster here, and they held more memory still.)
///
/// - One arena: with two, threads drift from one to the other as they meet a locked arena, and
///   each arena keeps its own free memory (generator -> Parquet peaked at 50 MiB for 1M records
///   and 66 MiB for 10M with two arenas, 49 and 54-57 with one, 48 and 53 with one and the
///   thresholds below, at the same CPU time or less).
/// - Fixed mmap and trim thresholds: glibc's default is a dynamic mmap threshold that starts at
///   128 KiB, so buffers of a few hundred KiB to a few MiB (a Kafka chunk, librdkafka's fetch
///   buffers, Parquet pages) were mapped fresh and faulted in, page by page, every time (11% of
///   a Kafka -> Parquet worker's CPU in page faults). Below 32 MiB they now come from the arena
///   and are reused; the trim thread below bounds what the arena keeps.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only tunes the allocator; it runs before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
        // Freed memory inside the heaps is handed back, checked once a second: with many open
        // Parquet files (each allocating and freeing compression buffers) RSS otherwise crept up
        // with the records written (213 -> 360 MiB from 100k to 1M records over 200 open S3
        // objects in tests/it/s3.rs; 191 -> 236 MiB with this). Only once more than TRIM_SLACK
        // of it is resident: a trim every second whatever there was to gain made the pages a
        // steady pipeline frees and takes again fault back in and be zeroed each time (about a
        // sixth of a Kafka -> Parquet worker's CPU, in page faults and sys time).
        let _ = std::thread::Builder::new().name("malloc-trim".into()).spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            if resident_free_bytes().is_none_or(|free| free > TRIM_SLACK) {
                // SAFETY: malloc_trim only returns free pages to the system; any thread may call it.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    }
}

/// Allocations at least this large are mapped on their own (and unmapped when freed).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of the arena past which `free` shrinks it at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Freed memory malloc may keep resident before it is handed back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_SLACK: usize = 32 << 20;

/// Resident anonymous memory (`/proc/self/statm`: resident less file-backed pages) that malloc
/// has not handed out: freed memory it keeps, plus stacks. None when either cannot be read.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_free_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut pages = statm.split_ascii_whitespace().skip(1).map(|n| n.parse::<usize>().ok());
    let (resident, shared) = (pages.next()??, pages.next()??);
    // SAFETY: sysconf and mallinfo2 only read process state.
    let (page, info) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::mallinfo2()) };
    let anonymous = resident.saturating_sub(shared) * usize::try_from(page).ok()?;
    Some(anonymous.saturating_sub(info.uordblks + info.hblkhd))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn load_and_build(path: &std::path::Path) -> Result<runtime::Pipeline, ConfigError> {
    let loaded = config::load(path)?;
    runtime::build(&loaded).await
}

async fn validate(path: PathBuf) -> u8 {
    match load_and_build(&path).await {
        Ok(p) => {
            let (sources, transforms, sinks) = p.counts();
            println!(
                "{}: pipeline `{}` is valid ({sources} source{}, {transforms} transform{}, {sinks} sink{})",
                path.display(),
                p.name(),
                plural(sources),
                plural(transforms),
                plural(sinks)
            );
            let mut ids: Vec<_> = p.schemas().keys().collect();
            ids.sort();
            for id in ids {
                println!("  {id}: {}", runtime::build::describe(p.schemas().get(id)));
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_CONFIG
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

async fn reset(path: PathBuf, to: &str, only: Option<&str>) -> u8 {
    use sluice::config::SourceConfig;
    use sluice::source::kafka::{KafkaSource, StartAt};
    let to = match StartAt::parse(to) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --to: {e}");
            return EXIT_CONFIG;
        }
    };
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let mut found = 0;
    for (id, cfg) in &loaded.file.sources {
        let SourceConfig::Kafka(c) = cfg else { continue };
        if only.is_some_and(|o| o != id) {
            continue;
        }
        found += 1;
        let source = match KafkaSource::new(id, &loaded.file.pipeline.name, c) {
            Ok(s) => s,
            Err((key, msg)) => {
                eprintln!("error: sources.{id}.{key}: {msg}");
                return EXIT_CONFIG;
            }
        };
        match source.reset_positions(to).await {
            Ok(parts) => {
                for (topic, partition, offset) in parts {
                    println!("{id}\t{topic}/{partition}\t{offset}");
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_RUNTIME;
            }
        }
    }
    if found == 0 {
        eprintln!(
            "error: the pipeline has no Kafka source{}",
            only.map(|o| format!(" named `{o}`")).unwrap_or_default()
        );
        return EXIT_CONFIG;
    }
    EXIT_OK
}

async fn run(
    path: PathBuf,
    metrics_addr: Option<SocketAddr>,
    progress: bool,
    worker: Option<String>,
    bounded: bool,
) -> u8 {
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    // The recorder goes in before the components are built: they keep metric handles.
    let health = Health::default();
    let server_stop = CancellationToken::new();
    let mut server = None;
    if let Some(addr) = metrics_addr {
        let worker = worker.unwrap_or_else(hostname);
        let started = match observe::install_recorder(&loaded.file.pipeline.name, &worker) {
            Ok(handle) => observe::serve(addr, handle, health.clone(), server_stop.clone()).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(h) => server = Some(h),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_RUNTIME;
            }
        }
    }

    let pipeline = match runtime::build(&loaded).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    tracing::info!(pipeline = %pipeline.name(), file = %path.display(), "starting");
    let result = pipeline.run(RunOptions { stop, progress, health, bounded, ..Default::default() }).await;
    server_stop.cancel();
    if let Some(h) = server {
        let _ = h.await;
    }
    match result {
        Ok(summary) => {
            print_summary(&summary);
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

/// The shared token of coordinator and workers, from the environment.
fn token() -> Result<String, u8> {
    match std::env::var(sluice::coordinator::TOKEN_ENV) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            eprintln!(
                "error: set {} to the token workers and coordinator share (from a Kubernetes Secret)",
                sluice::coordinator::TOKEN_ENV
            );
            Err(EXIT_CONFIG)
        }
    }
}

/// The autoscaler's options from the flags.
async fn autoscaler(
    a: AutoscaleArgs,
    pipeline: &std::path::Path,
    listen: SocketAddr,
    scheme: &str,
    log_format: LogFormat,
) -> Result<sluice::coordinator::server::AutoscaleOptions, String> {
    use sluice::autoscale::scaler::{KubeScaler, NoneScaler, ProcessScaler, Scaler};
    let policy = sluice::autoscale::Policy {
        min_replicas: a.min_replicas,
        max_replicas: a.max_replicas,
        catch_up_window: a.catch_up_window.as_secs_f64(),
        target_utilization: a.target_utilization,
        scale_down_stabilization: a.scale_down_stabilization.as_secs_f64(),
        max_step_up: a.max_step_up,
        scale_to_zero: a.scale_to_zero,
        idle_period: a.idle_period.as_secs_f64(),
        window: a.scale_window.as_secs_f64(),
        ..Default::default()
    };
    policy.validate().map_err(|e| format!("autoscaling: {e}"))?;
    let scaler: std::sync::Arc<dyn Scaler> = match a.scaler {
        ScalerKind::None => std::sync::Arc::new(NoneScaler::default()),
        ScalerKind::Kube => {
            let Some(d) = a.kube_deployment.as_deref() else {
                return Err("--scaler kube needs --kube-deployment (the worker Deployment's name)".into());
            };
            std::sync::Arc::new(KubeScaler::infer(d, a.kube_namespace.as_deref()).await.map_err(|e| e.to_string())?)
        }
        ScalerKind::Process => {
            let exe =
                std::env::current_exe().map_err(|e| format!("--scaler process: cannot find this program: {e}"))?;
            let host = if listen.ip().is_unspecified() { "127.0.0.1".to_string() } else { listen.ip().to_string() };
            let url = if listen.is_ipv6() && !listen.ip().is_unspecified() {
                format!("{scheme}://[{host}]:{}", listen.port())
            } else {
                format!("{scheme}://{host}:{}", listen.port())
            };
            let format = match log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            };
            let args = vec![
                "--log-format".to_string(),
                format.to_string(),
                "worker".to_string(),
                "--pipeline".to_string(),
                pipeline.display().to_string(),
                "--coordinator".to_string(),
                url,
            ];
            let stem = pipeline.file_stem().map_or("sluice".into(), |s| s.to_string_lossy().to_string());
            std::sync::Arc::new(ProcessScaler::new(exe, args, &format!("{stem}-worker")))
        }
    };
    Ok(sluice::coordinator::server::AutoscaleOptions { policy, interval: a.scale_interval, scaler })
}

async fn coordinator(
    path: PathBuf,
    listen: SocketAddr,
    timing: sluice::coordinator::server::Timing,
    autoscale: AutoscaleArgs,
    tls: sluice::coordinator::tls::ServerTls,
    log_format: LogFormat,
) -> u8 {
    let token = match token() {
        Ok(t) => t,
        Err(c) => return c,
    };
    if timing.heartbeat_interval * 3 > timing.lease_timeout {
        eprintln!("error: --heartbeat-interval must be at most a third of --lease-timeout (a worker's lease must outlive a lost heartbeat)");
        return EXIT_CONFIG;
    }
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let server_tls = match tls.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let scheme = if server_tls.is_some() { "https" } else { "http" };
    let autoscale = match autoscaler(autoscale, &path, listen, scheme, log_format).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let handle = observe::install_recorder(&loaded.file.pipeline.name, "coordinator").ok();
    let pipeline = match runtime::build(&loaded).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    let opts = sluice::coordinator::server::CoordinatorOptions {
        listen,
        token,
        timing,
        pipeline: pipeline.name().to_string(),
        sources: pipeline.sources(),
        metrics: handle,
        health: Health::default(),
        stop,
        autoscale,
        mutual_tls: server_tls.is_some() && tls.client_ca.is_some(),
        tls: server_tls,
    };
    match sluice::coordinator::server::serve(opts).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

async fn worker_mode(
    path: PathBuf,
    url: &str,
    metrics_addr: Option<SocketAddr>,
    worker: Option<String>,
    cpus: Option<f64>,
    tls: &sluice::coordinator::tls::ClientTls,
) -> u8 {
    let token = match token() {
        Ok(t) => t,
        Err(c) => return c,
    };
    let client = match sluice::coordinator::client::Client::new(url, &token, std::time::Duration::from_secs(5), tls) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: --coordinator: {e}");
            return EXIT_CONFIG;
        }
    };
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let name = worker.unwrap_or_else(hostname);
    let health = Health::default();
    let server_stop = CancellationToken::new();
    let mut server = None;
    if let Some(addr) = metrics_addr {
        let started = match observe::install_recorder(&loaded.file.pipeline.name, &name) {
            Ok(handle) => observe::serve(addr, handle, health.clone(), server_stop.clone()).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(h) => server = Some(h),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_RUNTIME;
            }
        }
    }
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    let result = sluice::coordinator::worker::run(
        loaded,
        sluice::coordinator::worker::WorkerOptions { client, name, health, stop, cpus },
    )
    .await;
    server_stop.cancel();
    if let Some(h) = server {
        let _ = h.await;
    }
    match result {
        Ok(()) => EXIT_OK,
        Err(sluice::Error::Config(e)) => {
            eprintln!("error: {e}");
            EXIT_CONFIG
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

async fn status(url: &str, json: bool, tls: &sluice::coordinator::tls::ClientTls) -> u8 {
    let token = match token() {
        Ok(t) => t,
        Err(c) => return c,
    };
    let client = match sluice::coordinator::client::Client::new(url, &token, std::time::Duration::from_secs(10), tls) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: --coordinator: {e}");
            return EXIT_CONFIG;
        }
    };
    match client.status().await {
        Ok(s) if json => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            EXIT_OK
        }
        Ok(s) => {
            print!("{}", sluice::coordinator::render_status(&s));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

/// First SIGINT/SIGTERM: graceful stop. Second: exit at once.
async fn watch_signals(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            return;
        }
    };
    for n in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if n == 0 {
            eprintln!("\nstopping: finishing the records in flight (send the signal again to exit at once)");
            stop.cancel();
        } else {
            eprintln!("\nsecond signal: exiting at once; uncommitted records will be read again next run");
            std::process::exit(i32::from(EXIT_FORCED));
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into())
}

fn print_summary(s: &RunSummary) {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let peak = observe::peak_rss_bytes().map(|b| format!(", peak memory (RSS) {}", human_bytes(b))).unwrap_or_default();
    eprintln!("{} in {:.2}s{peak}", if s.stopped { "stopped" } else { "done" }, secs);
    for c in &s.components {
        let (records, bytes) = match c.kind {
            "source" => (c.records_out, c.bytes_out),
            _ => (c.records_in, c.bytes_in),
        };
        let mut line = format!(
            "  {:<11} {:<20} {records:>12} records  {:>10}  {:>12.0} rec/s",
            c.kind,
            c.id,
            human_bytes(bytes),
            records as f64 / secs
        );
        if c.kind == "transform" {
            line.push_str(&format!("  → {} out", c.records_out));
        }
        if c.dead_lettered > 0 {
            line.push_str(&format!("  ({} dead-lettered)", c.dead_lettered));
        }
        eprintln!("{line}");
    }
}
