//! A [`FakeApi`] serving from inside a network namespace, for agents that run
//! in a lab node's namespace and reach "their" API server on 127.0.0.1.

use crate::{FakeApi, FakeApiOptions};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A [`FakeApi`] on its own thread, which has joined a network namespace
/// before binding, so the server listens on that namespace's loopback.
/// Dropping it stops the server and joins the thread.
///
/// ```no_run
/// # fn demo() -> std::io::Result<()> {
/// use ferry_testapi::NetnsApi;
/// let server = NetnsApi::start("/run/netns/ferry-node".into(), Default::default())?;
/// println!("{}", server.api().url()); // http://127.0.0.1:PORT inside ferry-node
/// # Ok(()) }
/// ```
pub struct NetnsApi {
    api: Option<FakeApi>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the server thread may take to join the namespace and bind.
const START_LIMIT: Duration = Duration::from_secs(60);

fn enter_netns(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid fd; it changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl NetnsApi {
    /// Starts the server in the namespace at `netns` (a path such as
    /// `/run/netns/NAME`); needs CAP_SYS_ADMIN for setns.
    pub fn start(netns: PathBuf, options: FakeApiOptions) -> std::io::Result<NetnsApi> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("ferry-fake-api".into()).spawn(move || {
            // The listening socket is created after this, so it lives in the namespace.
            if let Err(e) = enter_netns(&netns) {
                let _ = tx.send(Err(std::io::Error::new(e.kind(), format!("joining {}: {e}", netns.display()))));
                return;
            }
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async {
                let _ = tx.send(Ok(FakeApi::start_with(options).await));
                let _ = stopped.await;
            });
        })?;
        let api = rx
            .recv_timeout(START_LIMIT)
            .map_err(|_| std::io::Error::other("the fake API server did not start within a minute"))??;
        Ok(NetnsApi { api: Some(api), stop: Some(stop), thread: Some(thread) })
    }

    /// The server's handle, to change objects and inject failures.
    pub fn api(&self) -> &FakeApi {
        self.api.as_ref().expect("the server lives until drop")
    }
}

impl Drop for NetnsApi {
    fn drop(&mut self) {
        drop(self.api.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
