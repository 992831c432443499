//! Connecting to the Kubernetes API: which credentials ferry uses, and errors that say how to fix them.
//!
//! An explicit `--kubeconfig` wins; otherwise a pod uses its service account
//! (in-cluster config), and anything else uses the default kubeconfig
//! (`KUBECONFIG`, else `~/.kube/config`), the order kube-proxy uses.

use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use std::path::{Path, PathBuf};

/// Failure to build a Kubernetes API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot use kubeconfig {path}: {source}; check the file passed with --kubeconfig")]
    Kubeconfig { path: PathBuf, source: KubeconfigError },
    #[error(
        "running in a pod (KUBERNETES_SERVICE_HOST is set) but the in-cluster config failed: {source}; \
         check that the service account token is mounted (automountServiceAccountToken) or pass --kubeconfig"
    )]
    InCluster { source: InClusterError },
    #[error("no in-cluster service account and no usable kubeconfig at {looked_at}: {source}; pass --kubeconfig")]
    NoConfig { looked_at: String, source: KubeconfigError },
    #[error("cannot build a Kubernetes client for {url}: {source}; check the server URL and TLS settings")]
    Client { url: String, source: kube::Error },
}

/// Where the client's configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConfigSource {
    File(PathBuf),
    InCluster,
    DefaultKubeconfig,
}

fn choose(kubeconfig: Option<&Path>, in_pod: bool) -> ConfigSource {
    match kubeconfig {
        // An operator who names a file means it, even inside a pod.
        Some(path) => ConfigSource::File(path.to_path_buf()),
        None if in_pod => ConfigSource::InCluster,
        None => ConfigSource::DefaultKubeconfig,
    }
}

fn in_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty())
}

/// Builds a client: `kubeconfig` if given, else the pod's service account when
/// running in a pod, else the default kubeconfig (`KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ApiError> {
    let options = KubeConfigOptions::default();
    let config = match choose(kubeconfig, in_pod()) {
        ConfigSource::File(path) => {
            let loaded = match Kubeconfig::read_from(&path) {
                Ok(k) => kube::Config::from_custom_kubeconfig(k, &options).await,
                Err(e) => Err(e),
            };
            loaded.map_err(|source| ApiError::Kubeconfig { path, source })?
        }
        ConfigSource::InCluster => kube::Config::incluster().map_err(|source| ApiError::InCluster { source })?,
        ConfigSource::DefaultKubeconfig => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|source| ApiError::NoConfig { looked_at: default_kubeconfig_location(), source })?,
    };
    let url = config.cluster_url.to_string();
    kube::Client::try_from(config).map_err(|source| ApiError::Client { url, source })
}

/// Where kube looks for a kubeconfig, in the operator's words.
fn default_kubeconfig_location() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(v) if !v.is_empty() => format!("KUBECONFIG={v}"),
        _ => std::env::home_dir()
            .map(|h| h.join(".kube/config").display().to_string())
            .unwrap_or_else(|| "~/.kube/config".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_kubeconfig_wins_then_pod_then_default() {
        let p = Path::new("/etc/ferry/kubeconfig");
        assert_eq!(choose(Some(p), true), ConfigSource::File(p.into()));
        assert_eq!(choose(Some(p), false), ConfigSource::File(p.into()));
        assert_eq!(choose(None, true), ConfigSource::InCluster);
        assert_eq!(choose(None, false), ConfigSource::DefaultKubeconfig);
    }

    #[tokio::test]
    async fn missing_kubeconfig_names_the_file_and_the_fix() {
        let Err(err) = client(Some(Path::new("/nonexistent/ferry-kubeconfig"))).await else {
            panic!("a missing kubeconfig must be an error");
        };
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/ferry-kubeconfig") && msg.contains("--kubeconfig"), "{msg}");
    }

    #[tokio::test]
    async fn a_kubeconfig_file_builds_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{name: test, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             users: [{name: test, user: {token: abc}}]\n\
             contexts: [{name: test, context: {cluster: test, user: test}}]\n",
        )
        .unwrap();
        client(Some(&path)).await.unwrap();
    }
}
