//! Logs and traces, set up alike by the coordinator and every worker.
//!
//! It lives here because this is the one crate both binaries share, and because half of it is
//! wire format: the W3C trace context travels in a client's gRPC metadata or HTTP headers and in
//! every `StepPlan` the coordinator sends its ranks.
//!
//! - **Logs** go to stderr through `tracing`, as text or one JSON object per line
//!   (`--log-format json`), filtered by `RUST_LOG` (servers default to `warn`, and `info` for
//!   Helios; one-shot commands to `warn`).
//! - **Traces** are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`. Without
//!   one no exporter exists, so nothing ever connects anywhere. The standard `OTEL_*`
//!   variables apply: `OTEL_TRACES_SAMPLER`/`_ARG` (default: parent-based, always on),
//!   `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_RESOURCE_ATTRIBUTES`.
//!   Spans go to OpenTelemetry by their own filter (Helios' spans and events at `info` and
//!   above), whatever `RUST_LOG` says, so quiet logs do not cost the traces.
//!
//! A worker learns its rank at Init, after its exporter exists, so the rank is an attribute of
//! every worker span rather than of the resource (which only says `helios-worker` and the pid).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::str::FromStr;

use anyhow::{Context as _, Result};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields flattened
    /// (`message`, `request_id`, ...) and `spans`, the fields of the spans it happened in.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("{s:?} is not a log format (text or json)")),
        }
    }
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// What is logged when `RUST_LOG` is unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDefault {
    /// A server: warnings, and Helios' own `info` lines (a line per request).
    Server,
    /// A one-shot command (`helios generate`): warnings and errors only.
    Quiet,
}

impl LogDefault {
    fn filter(self) -> &'static str {
        match self {
            Self::Server => "warn,helios=info,helios_coordinator=info,helios_worker=info",
            Self::Quiet => "warn",
        }
    }
}

/// Whether spans are exported: an OTLP endpoint is configured and the SDK is not disabled.
pub fn otlp_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The process' telemetry: holds the span exporter, if there is one. Dropping it (or
/// [`Telemetry::shutdown`]) sends the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global `tracing` subscriber: the log layer and, when an OTLP endpoint is
    /// configured, the OpenTelemetry layer exporting as `service_name` (`helios-coordinator`,
    /// `helios-worker`). Call it inside the tokio runtime: the gRPC exporter's channel lives
    /// on it.
    pub fn init(
        service_name: &'static str,
        log_format: LogFormat,
        default: LogDefault,
    ) -> Result<Self> {
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default.filter()));
        let logs: Box<dyn Layer<Registry> + Send + Sync> = match log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
        };
        let provider = if otlp_configured() {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .context("setting up the OTLP span exporter")?;
            let resource = Resource::builder()
                .with_service_name(service_name)
                .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        } else {
            None
        };
        let traces = provider.as_ref().map(|p| {
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("helios"))
                .with_filter(Targets::new().with_target("helios", LevelFilter::INFO))
        });
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init()
            .context("installing the tracing subscriber")?;
        Ok(Self { provider })
    }

    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still buffered and stops exporting; for a process about to exit.
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: sending the last spans: {e}");
            }
        }
    }

    /// A handle that can flush from another thread (a worker exiting from its stdin watcher).
    pub fn flusher(&self) -> impl Fn() + Send + 'static {
        let provider = self.provider.clone();
        move || {
            if let Some(p) = &provider {
                let _ = p.force_flush();
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads a W3C trace context (`traceparent`, `tracestate`) from gRPC metadata.
pub struct MetadataExtractor<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Reads a W3C trace context from HTTP headers.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes a trace context into a `StepPlan.trace_context`.
struct MapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// Reads one from it.
struct MapExtractor<'a>(&'a HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The remote parent a carrier names, if it names a valid one.
pub fn extract(carrier: &dyn Extractor) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The remote parent in a `StepPlan.trace_context`; an untraced step's empty map costs
/// nothing (a worker asks on every step).
pub fn extract_map(map: &HashMap<String, String>) -> Option<Context> {
    if map.is_empty() {
        return None;
    }
    extract(&MapExtractor(map))
}

/// `span`'s trace context as W3C headers, for a `StepPlan`; empty when it is not sampled
/// (nothing is exported, so the ranks need not trace it either).
pub fn inject(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_sampled() {
        TraceContextPropagator::new().inject_context(&cx, &mut MapInjector(&mut map));
    }
    map
}

/// `span`'s OpenTelemetry span context, when it is sampled (for links and parent choices).
pub fn sampled_context(span: &tracing::Span) -> Option<SpanContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_sampled().then_some(sc)
}

/// Makes `parent` the OpenTelemetry parent of `span` (before it starts). Without the
/// OpenTelemetry layer (no endpoint) this does nothing.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    // Only fails when the span is disabled or tracing is not exported: nothing to link then.
    let _ = span.set_parent(parent);
}

/// Links `span` to another span (a step to the requests it served besides its parent's).
pub fn add_link(span: &tracing::Span, to: SpanContext) {
    span.add_link(to);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_through_a_map() {
        let mut map = HashMap::new();
        map.insert(
            "traceparent".to_string(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
        );
        let cx = extract_map(&map).expect("a valid parent");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        map.insert("traceparent".to_string(), "garbage".to_string());
        assert!(extract_map(&map).is_none());
        assert!(extract_map(&HashMap::new()).is_none());
    }

    #[test]
    fn headers_and_metadata_carry_the_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        let cx = extract(&HeaderExtractor(&h)).expect("from headers");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("traceparent", tp.parse().unwrap());
        let cx = extract(&MetadataExtractor(&m)).expect("from metadata");
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().is_err());
    }
}
