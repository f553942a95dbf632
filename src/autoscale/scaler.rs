//! Scalers: what applies the policy's replica count.
//!
//! - `kube`: patches the worker Deployment's `scale` subresource (RBAC: `get` and `patch` on
//!   `deployments/scale` of that one Deployment).
//! - `process`: starts and stops local `sluice worker` processes (demos, the benchmark harness,
//!   tests); a stopped worker gets SIGTERM, drains, commits and leaves.
//! - `none`: applies nothing; the decision is published as `sluice_desired_replicas` for KEDA or
//!   an HPA to act on.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Result};

/// Applies replica counts.
#[async_trait]
pub trait Scaler: Send + Sync {
    fn name(&self) -> &'static str;
    /// The replica count asked for now; `None` when this scaler does not own one (`none`: the
    /// running workers count).
    async fn current(&self) -> Result<Option<u32>>;
    async fn scale(&self, replicas: u32) -> Result<()>;
    /// Called when the coordinator stops.
    async fn shutdown(&self) {}
}

fn scaler_error(scaler: &str, message: String) -> Error {
    Error::Internal { component: format!("{scaler} scaler"), message }
}

/// `--scaler none`: keeps the last count it was asked for, like a Deployment nobody else
/// scales, so the published `sluice_desired_replicas` holds between decisions instead of falling
/// back to the running workers (an HPA driven by it could never scale down otherwise).
#[derive(Default)]
pub struct NoneScaler {
    desired: Mutex<Option<u32>>,
}

#[async_trait]
impl Scaler for NoneScaler {
    fn name(&self) -> &'static str {
        "none"
    }
    async fn current(&self) -> Result<Option<u32>> {
        Ok(*self.desired.lock().unwrap_or_else(|e| e.into_inner()))
    }
    async fn scale(&self, replicas: u32) -> Result<()> {
        *self.desired.lock().unwrap_or_else(|e| e.into_inner()) = Some(replicas);
        Ok(())
    }
}

/// `--scaler kube`: the worker Deployment's scale subresource.
pub struct KubeScaler {
    api: kube::Api<k8s_openapi::api::apps::v1::Deployment>,
    deployment: String,
    namespace: String,
}

impl KubeScaler {
    /// From the in-cluster service account, else `KUBECONFIG` / `~/.kube/config`.
    ///
    /// # Errors
    /// When no configuration is found or the client cannot be built.
    pub async fn infer(deployment: &str, namespace: Option<&str>) -> Result<Self> {
        let config = kube::Config::infer().await.map_err(|e| {
            scaler_error("kube", format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"))
        })?;
        Self::from_config(config, deployment, namespace)
    }

    /// # Errors
    /// When the client cannot be built from `config`.
    pub fn from_config(config: kube::Config, deployment: &str, namespace: Option<&str>) -> Result<Self> {
        let namespace = namespace.map_or_else(|| config.default_namespace.clone(), str::to_string);
        let client = kube::Client::try_from(config)
            .map_err(|e| scaler_error("kube", format!("cannot build the Kubernetes client: {e}")))?;
        Ok(KubeScaler { api: kube::Api::namespaced(client, &namespace), deployment: deployment.to_string(), namespace })
    }

    fn what(&self) -> String {
        format!("deployments/{} scale in namespace {}", self.deployment, self.namespace)
    }
}

#[async_trait]
impl Scaler for KubeScaler {
    fn name(&self) -> &'static str {
        "kube"
    }

    async fn current(&self) -> Result<Option<u32>> {
        let scale = self
            .api
            .get_scale(&self.deployment)
            .await
            .map_err(|e| scaler_error("kube", format!("reading {}: {e}", self.what())))?;
        Ok(Some(scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32))
    }

    async fn scale(&self, replicas: u32) -> Result<()> {
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        let params = kube::api::PatchParams { field_manager: Some("sluice".into()), ..Default::default() };
        let got = self
            .api
            .patch_scale(&self.deployment, &params, &kube::api::Patch::Merge(&patch))
            .await
            .map_err(|e| scaler_error("kube", format!("patching {} to {replicas}: {e}", self.what())))?;
        let now = got.spec.and_then(|s| s.replicas).unwrap_or(-1);
        if i64::from(now) != i64::from(replicas) {
            return Err(scaler_error(
                "kube",
                format!("{} answered replicas {now} after a patch to {replicas}", self.what()),
            ));
        }
        Ok(())
    }
}

/// `--scaler process`: local `sluice worker` processes.
pub struct ProcessScaler {
    program: PathBuf,
    args: Vec<String>,
    name: String,
    state: Mutex<Processes>,
}

#[derive(Default)]
struct Processes {
    running: Vec<tokio::process::Child>,
    stopping: Vec<tokio::process::Child>,
    started: u32,
}

impl ProcessScaler {
    /// Workers run `program args… --worker NAME-N`.
    pub fn new(program: PathBuf, args: Vec<String>, name: &str) -> Self {
        ProcessScaler { program, args, name: name.to_string(), state: Mutex::default() }
    }

    fn reap(p: &mut Processes) {
        p.running.retain_mut(|c| {
            let alive = matches!(c.try_wait(), Ok(None));
            if !alive {
                tracing::warn!(pid = c.id(), "a worker process exited by itself");
            }
            alive
        });
        p.stopping.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }
}

fn sigterm(c: &tokio::process::Child) {
    if let Some(pid) = c.id() {
        // SAFETY: kill only sends a signal to a child this scaler started and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

#[async_trait]
impl Scaler for ProcessScaler {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn current(&self) -> Result<Option<u32>> {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::reap(&mut p);
        Ok(Some(p.running.len() as u32))
    }

    async fn scale(&self, replicas: u32) -> Result<()> {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::reap(&mut p);
        while (p.running.len() as u32) < replicas {
            let name = format!("{}-{}", self.name, p.started);
            let mut cmd = tokio::process::Command::new(&self.program);
            #[cfg(target_os = "linux")]
            // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
            unsafe {
                // A worker whose coordinator died gets SIGTERM: it drains and exits rather than
                // running on unsupervised.
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let child = cmd
                .args(&self.args)
                .args(["--worker", &name])
                // Each worker would bind the coordinator's metrics address.
                .env_remove("SLUICE_METRICS_ADDR")
                .env_remove("SLUICE_COORDINATOR_LISTEN")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| scaler_error("process", format!("cannot start {}: {e}", self.program.display())))?;
            tracing::info!(worker = %name, pid = child.id(), "started a worker process");
            p.started += 1;
            p.running.push(child);
        }
        while (p.running.len() as u32) > replicas {
            // The newest goes first: the oldest hold the most settled shards.
            let c = p.running.pop().expect("more than replicas");
            tracing::info!(pid = c.id(), "stopping a worker process (SIGTERM: drain, commit, leave)");
            sigterm(&c);
            p.stopping.push(c);
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let mut all: Vec<tokio::process::Child> = {
            let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let mut all: Vec<_> = p.running.drain(..).collect();
            all.append(&mut p.stopping);
            all
        };
        for c in &all {
            sigterm(c);
        }
        // One deadline for all of them (they drain in parallel), then SIGKILL.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for c in &mut all {
            if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                tracing::warn!(pid = c.id(), "a worker process did not stop within 30 s: killed");
                let _ = c.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_none_scaler_holds_its_last_target_for_the_next_decision() {
        let s = NoneScaler::default();
        // Before any decision: the running workers count (None).
        assert_eq!(s.current().await.unwrap(), None);
        s.scale(4).await.unwrap();
        assert_eq!(s.current().await.unwrap(), Some(4));
        s.scale(2).await.unwrap();
        assert_eq!(s.current().await.unwrap(), Some(2));
    }
}
