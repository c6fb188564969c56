//! Logging and tracing setup: formatted logs filtered by RUST_LOG, and with the `otlp` feature the spans also
//! exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set (filtered by OTEL_TRACES_FILTER).

use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Flushes exported spans when dropped (at exit).
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("OpenTelemetry shutdown: {e}");
            }
        }
    }
}

/// Installs the global subscriber. Call once, inside the tokio runtime.
pub fn init() -> Telemetry {
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry =
        tracing_subscriber::registry().with(tracing_subscriber::fmt::layer().with_filter(logs));
    #[cfg(feature = "otlp")]
    {
        let provider = otlp_provider();
        let layer = provider.as_ref().map(|provider| {
            use opentelemetry::trace::TracerProvider as _;
            // Exported spans have their own filter: a trace wants the debug spans (tokenize, batch) that
            // the log leaves out.
            let traces = EnvFilter::try_from_env("OTEL_TRACES_FILTER")
                .unwrap_or_else(|_| EnvFilter::new("info,rerank_server=debug"));
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("rerank-server"))
                .with_filter(traces)
        });
        registry.with(layer).init();
        Telemetry { provider }
    }
    #[cfg(not(feature = "otlp"))]
    {
        registry.init();
        Telemetry {}
    }
}

/// A batch exporter to OTEL_EXPORTER_OTLP_ENDPOINT, if set (the exporter reads the OTEL_* variables).
#[cfg(feature = "otlp")]
fn otlp_provider() -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("OpenTelemetry exporter not started: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("rerank-server")
        .build();
    Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}
