//! The life of a herd binary: settings, logs, a runtime, signals, and an exit code.
//!
//! A service's `main` is one call to [`run_binary`]; a command-line tool's is one call to
//! [`block_on_main`].

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tower::BoxError;

use crate::error::ServeError;
use crate::mesh::Mesh;
use crate::server::Services;
use crate::settings::Settings;

/// Every program built on herd allocates with jemalloc, configured (`.cargo/config.toml`) to give
/// memory that has been free for a second back to the system from a thread of its own: glibc's
/// allocator keeps what thousands of closed connections used for as long as the process lives.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The whole life of a service binary: parse settings (usage errors exit 64), set up logs, connect,
/// bind, build the services with `build`, serve until SIGTERM/SIGINT, drain, exit 0.
pub fn run_binary<F, Fut>(service: &'static str, default_listen: &'static str, build: F) -> ExitCode
where
    F: FnOnce(&mut Mesh) -> Fut,
    Fut: Future<Output = Result<Services, BoxError>>,
{
    let settings = Settings::for_service(service, default_listen);
    // A failure is logged once (in the log format chosen), not printed again.
    let served = block_on(async move {
        let instance_id = Mesh::new_instance_id(service);
        let telemetry = crate::telemetry::init(&settings.log_format, service, &instance_id);
        let metrics =
            crate::metrics::init(service, &instance_id, settings.metrics_listen.is_some());
        let served = async {
            let metrics = metrics?;
            let _exposition = match (&metrics, settings.metrics_listen) {
                (Some(metrics), Some(address)) => {
                    let listener =
                        TcpListener::bind(address)
                            .await
                            .map_err(|source| ServeError::Bind {
                                address: address.to_string(),
                                source,
                            })?;
                    tracing::info!(address = %listener.local_addr().unwrap_or(address), "metrics listening");
                    Some(AbortOnDrop(tokio::spawn(crate::metrics::exposition::serve(
                        listener,
                        metrics.reader(),
                    ))))
                }
                _ => None,
            };
            let listener =
                TcpListener::bind(settings.listen)
                    .await
                    .map_err(|source| ServeError::Bind {
                        address: settings.listen.to_string(),
                        source,
                    })?;
            let mut mesh = Mesh::connect(settings, service, instance_id).await?;
            let services = build(&mut mesh).await.map_err(ServeError::Services)?;
            // The runtime's own sections (the sampling ratio) apply even to an instance whose
            // services read no configuration.
            let _ = mesh.runtime_config();
            let served = mesh.serve(listener, services, shutdown_signal()).await;
            // The calls of the drain are in the last push.
            if let Some(metrics) = metrics {
                metrics.shutdown().await;
            }
            served
        }
        .await;
        if let Err(e) = &served {
            tracing::error!(error = %e, "exiting");
        }
        // Spans of every call served before exit are exported before the process ends.
        telemetry.shutdown().await;
        served.is_ok()
    });
    match served {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(code) => code,
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Runs a command-line program's `main` on a multi-thread tokio runtime: an error is printed
/// (with its causes, for errors that print them under `{:#}`) and the process exits 1.
pub fn block_on_main<F, E>(main: F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    match block_on(main) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// Runs `main` to completion on a new multi-threaded runtime; a runtime that cannot start is
/// reported and gives the exit code.
fn block_on<F: Future>(main: F) -> Result<F::Output, ExitCode> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Ok(runtime.block_on(main)),
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}
