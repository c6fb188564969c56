//! The rerank-server binary: configuration, logging, and signal handling around `server::start`.

use clap::Parser;
use rerank_server::config::{Cli, Config};
use rerank_server::server;

/// Every batch allocates activations of megabytes; mimalloc reuses their pages instead of returning them to
/// the kernel and faulting them back in zeroed (the system allocator's behaviour for such sizes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _telemetry = rerank_server::telemetry::init();
    let cli = Cli::parse();
    if let Some(addr) = &cli.health_check {
        return health_check(addr).await;
    }
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), rerank_server::error::StartupError> {
    let config = Config::load(&cli)?;
    tracing::info!(config = %config.to_log_string(), "effective configuration");
    let mut running = server::start(config).await?;
    tokio::select! {
        ready = running.ready() => ready?,
        _ = shutdown_signal() => return drain(running).await,
    }
    tracing::info!(addr = %running.local_addr, "serving rerank.v1.RerankerService");
    shutdown_signal().await;
    tracing::info!("shutting down");
    drain(running).await
}

/// The drain, unless a second signal asks to end at once.
async fn drain(running: server::RunningServer) -> Result<(), rerank_server::error::StartupError> {
    tokio::select! {
        drained = running.shutdown() => drained,
        _ = shutdown_signal() => {
            tracing::warn!("second signal: exiting without finishing the calls in flight");
            Err(rerank_server::error::StartupError::Interrupted)
        }
    }
}

/// Exit status for container health checks: success only when the server reports SERVING.
async fn health_check(addr: &str) -> std::process::ExitCode {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let status = async {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok::<i32, String>(response.into_inner().status)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), status).await {
        Ok(Ok(status)) if status == ServingStatus::Serving as i32 => {
            std::process::ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            eprintln!("not serving (status {status})");
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("health check failed: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("health check timed out");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
