//! `GET /metrics`: Prometheus text format through `prometheus-client`.
//!
//! HTTP requests are counted and timed as they are served; everything else (keys,
//! key streams, exporters, the store) is read from the domain on each scrape by a
//! collector, so the figures never drift from what the daemon actually holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::duration::now_millis;
use crate::export::Exporters;
use crate::keys::Keys;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// The metrics registry and the HTTP families the server updates.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
}

/// Reads the domain's figures at scrape time.
struct DomainCollector {
    keys: Arc<Keys>,
    exporters: Arc<Exporters>,
}

impl std::fmt::Debug for DomainCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One labelled family of values: `label` names each value's label.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &'static str,
    values: &[(String, M)],
) -> std::fmt::Result {
    if values.is_empty() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (value_label, m) in values {
        m.encode(metric.encode_family(&[(label, value_label.as_str())])?)?;
    }
    Ok(())
}

impl Collector for DomainCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.keys.counters;
        counter(
            &mut enc,
            "keyexportd_keys_created",
            "Keys created since start.",
            c.created.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "keyexportd_keys_purged",
            "Keys purged since start.",
            c.purged.load(Ordering::Relaxed),
        )?;
        if let Ok(live) = self.keys.live_keys() {
            gauge(
                &mut enc,
                "keyexportd_keys_live",
                "Keys not yet purged.",
                live as i64,
            )?;
        }
        let streams: Vec<(String, ConstGauge)> = self
            .keys
            .key_streams()
            .iter()
            .map(|s| {
                (
                    s.record.name.clone(),
                    ConstGauge::new(self.keys.stream_length(s) as i64),
                )
            })
            .collect();
        family(
            &mut enc,
            "keyexportd_key_stream_length",
            "Entries in each stream's key stream.",
            MetricType::Gauge,
            "stream",
            &streams,
        )?;
        let mut tables: Vec<(String, ConstGauge)> = self
            .keys
            .current_key_tables()
            .into_iter()
            .map(|(name, n)| (name, ConstGauge::new(n as i64)))
            .collect();
        tables.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            &mut enc,
            "keyexportd_current_key_tables",
            "Rotation periods whose current-key pointers each stream still holds.",
            MetricType::Gauge,
            "stream",
            &tables,
        )?;

        let exporters = self.exporters.list();
        let now = now_millis();
        let pick =
            |f: &dyn Fn(&crate::export::batch::Status) -> u64| -> Vec<(String, ConstCounter)> {
                exporters
                    .iter()
                    .map(|(d, s)| (d.name.clone(), ConstCounter::new(f(s))))
                    .collect()
            };
        family(
            &mut enc,
            "keyexportd_exporter_objects",
            "Objects written since start.",
            MetricType::Counter,
            "exporter",
            &pick(&|s| s.objects_written),
        )?;
        family(
            &mut enc,
            "keyexportd_exporter_keys",
            "Keys exported (all time).",
            MetricType::Counter,
            "exporter",
            &pick(&|s| s.state.exported_keys),
        )?;
        family(
            &mut enc,
            "keyexportd_exporter_upload_failures",
            "Failed batch attempts since start.",
            MetricType::Counter,
            "exporter",
            &pick(&|s| s.failed_attempts),
        )?;
        let pending: Vec<(String, ConstGauge)> = exporters
            .iter()
            .map(|(d, s)| (d.name.clone(), ConstGauge::new(s.pending_keys as i64)))
            .collect();
        family(
            &mut enc,
            "keyexportd_exporter_pending_keys",
            "Keys waiting for the next batch.",
            MetricType::Gauge,
            "exporter",
            &pending,
        )?;
        let since: Vec<(String, ConstGauge<f64>)> = exporters
            .iter()
            .map(|(d, s)| {
                let last = s.state.last_batch_at.unwrap_or(d.created_at);
                (
                    d.name.clone(),
                    ConstGauge::new(now.saturating_sub(last) as f64 / 1000.0),
                )
            })
            .collect();
        family(
            &mut enc,
            "keyexportd_exporter_seconds_since_last_batch",
            "Seconds since the last successful batch (since creation before the first).",
            MetricType::Gauge,
            "exporter",
            &since,
        )?;
        if let Ok(size) = self.keys.store_size() {
            gauge(
                &mut enc,
                "keyexportd_store_size_bytes",
                "Size of the sled database on disk.",
                size as i64,
            )?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(keys: Arc<Keys>, exporters: Arc<Exporters>) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "keyexportd_http_requests",
            "HTTP requests by route, method and status.",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.5, 14))
        });
        registry.register(
            "keyexportd_http_request_duration_seconds",
            "Time to answer HTTP requests, by route.",
            latency.clone(),
        );
        registry.register_collector(Box::new(DomainCollector { keys, exporters }));
        Metrics {
            registry,
            requests,
            latency,
        }
    }

    /// Records one answered request.
    pub fn observe(&self, route: &'static str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method: method.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
