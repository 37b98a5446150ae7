//! OTLP metrics: the agent's figures as one `ExportMetricsServiceRequest` per export
//! interval.
//!
//! The agent builds a [`MetricsBatch`] on every tick: cumulative values since it started,
//! one [`ResourceIn`] per sandbox (its `faas.*` resource attributes) and one for the host.
//! Histograms arrive as explicit-bucket counts the agent read out of its hdrhistograms
//! ([`DURATION_BOUNDS_S`], [`MEMORY_BOUNDS_BY`]). [`MetricsEncoder`] turns batches into
//! requests, in cumulative temporality or, for backends that want it (New Relic), delta:
//! each series' change since the previous export.

use super::attrs::{key_values, resource, AttrValue, Attrs};
use super::{Encode, Encoded, OtlpConfig, Signal, Temporality};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use prost::Message;
use std::collections::HashMap;

/// Bucket bounds (seconds) of the duration histograms: the OpenTelemetry FaaS/HTTP
/// recommendation (5 ms ... 10 s) with sub-millisecond bounds in front, because warm
/// invocations here take a fraction of a millisecond, and 30/60 s behind for timeouts.
pub const DURATION_BOUNDS_S: [f64; 21] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];

/// Bucket bounds (bytes) of the memory histograms: 1 MiB to 8 GiB in powers of two.
pub const MEMORY_BOUNDS_BY: [f64; 14] = [
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
    2147483648.0,
    4294967296.0,
    8589934592.0,
];

/// One export tick's figures.
#[derive(Debug, Clone, Default)]
pub struct MetricsBatch {
    /// When the cumulative counts began (agent start), ns since the Unix epoch.
    pub start_unix_nano: u64,
    /// When the figures were read, ns since the Unix epoch.
    pub time_unix_nano: u64,
    /// Per resource (a sandbox, a function, the host).
    pub resources: Vec<ResourceIn>,
}

impl MetricsBatch {
    /// Data points in the batch (the unit of the export counters).
    pub fn points(&self) -> u64 {
        self.resources
            .iter()
            .flat_map(|r| &r.metrics)
            .map(|m| m.points.len() as u64)
            .sum()
    }
}

/// The metrics of one resource.
#[derive(Debug, Clone, Default)]
pub struct ResourceIn {
    /// Attributes added to the agent's own (service.name, host.id, ...): the sandbox's
    /// `faas.instance`, `faas.name`, `faas.max_memory`, `sandscope.guest.boot_id`, ...
    pub attributes: Attrs,
    /// Its metrics.
    pub metrics: Vec<MetricIn>,
}

/// One metric.
#[derive(Debug, Clone)]
pub struct MetricIn {
    /// OTel name (`faas.invoke_duration`).
    pub name: &'static str,
    /// Description.
    pub description: &'static str,
    /// UCUM unit (`s`, `By`, `{invocation}`).
    pub unit: &'static str,
    /// Data points.
    pub points: Points,
}

/// Data points of one metric, by instrument kind. Counters and histograms are
/// cumulative since [`MetricsBatch::start_unix_nano`]; gauges and up-down counters are
/// current values.
#[derive(Debug, Clone)]
pub enum Points {
    /// Monotonic sum.
    Counter(Vec<Point<u64>>),
    /// Non-monotonic sum (sandboxes by state, committed memory).
    UpDown(Vec<Point<i64>>),
    /// Gauge.
    Gauge(Vec<Point<f64>>),
    /// Explicit-bucket histogram.
    Histogram(Vec<HistPoint>),
}

impl Points {
    fn len(&self) -> usize {
        match self {
            Points::Counter(p) => p.len(),
            Points::UpDown(p) => p.len(),
            Points::Gauge(p) => p.len(),
            Points::Histogram(p) => p.len(),
        }
    }
}

/// A scalar data point.
#[derive(Debug, Clone)]
pub struct Point<T> {
    /// Point attributes (`faas.coldstart`, `phase`, `state`, ...).
    pub attributes: Attrs,
    /// Value.
    pub value: T,
}

/// A histogram data point.
#[derive(Debug, Clone, Default)]
pub struct HistPoint {
    /// Point attributes.
    pub attributes: Attrs,
    /// Upper bounds (inclusive), ascending.
    pub bounds: Vec<f64>,
    /// `bounds.len() + 1` counts: bucket i holds values in (bounds[i-1], bounds[i]], the
    /// last one values above the last bound.
    pub bucket_counts: Vec<u64>,
    /// Values.
    pub count: u64,
    /// Sum of the values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// What delta temporality remembers of a series.
#[derive(Debug, Clone)]
enum Prev {
    Counter(u64),
    Hist {
        count: u64,
        sum: f64,
        buckets: Vec<u64>,
    },
}

/// Encodes [`MetricsBatch`]es; see the module docs.
#[derive(Debug)]
pub struct MetricsEncoder {
    base: Vec<(String, String)>,
    temporality: Temporality,
    limit: Option<usize>,
    /// Delta only: series key → (last cumulative value, time it was read).
    prev: HashMap<String, (Prev, u64)>,
}

impl MetricsEncoder {
    /// An encoder with `cfg`'s resource, temporality and attribute limit.
    pub fn new(cfg: &OtlpConfig) -> Self {
        Self {
            base: cfg.resource.clone(),
            temporality: cfg.temporality,
            limit: cfg.max_attr_value_len,
            prev: HashMap::new(),
        }
    }

    fn temporality(&self) -> i32 {
        match self.temporality {
            Temporality::Cumulative => AggregationTemporality::Cumulative as i32,
            Temporality::Delta => AggregationTemporality::Delta as i32,
        }
    }

    /// Encode one batch's metrics; `seen` collects the delta series keys it touched.
    fn resource_metrics(
        &mut self,
        mut b: MetricsBatch,
        seen: &mut Vec<String>,
    ) -> Vec<ResourceMetrics> {
        let delta = self.temporality == Temporality::Delta;
        let resources = std::mem::take(&mut b.resources);
        let mut out = Vec::with_capacity(resources.len());
        for r in resources {
            let rkey = series_key(&r.attributes);
            let mut metrics = Vec::with_capacity(r.metrics.len());
            for m in r.metrics {
                let data = match m.points {
                    Points::Counter(ps) => metric::Data::Sum(Sum {
                        data_points: ps
                            .into_iter()
                            .map(|p| {
                                let key =
                                    format!("{rkey}|{}|{}", m.name, series_key(&p.attributes));
                                let (value, start) = if delta {
                                    seen.push(key.clone());
                                    self.counter_delta(key, p.value, &b)
                                } else {
                                    (p.value, b.start_unix_nano)
                                };
                                NumberDataPoint {
                                    attributes: key_values(&p.attributes, self.limit),
                                    start_time_unix_nano: start,
                                    time_unix_nano: b.time_unix_nano,
                                    value: Some(number_data_point::Value::AsInt(
                                        value.min(i64::MAX as u64) as i64,
                                    )),
                                    ..Default::default()
                                }
                            })
                            .collect(),
                        aggregation_temporality: self.temporality(),
                        is_monotonic: true,
                    }),
                    // Up-down counters stay cumulative in both modes (they are levels,
                    // and delta backends ask for them that way).
                    Points::UpDown(ps) => metric::Data::Sum(Sum {
                        data_points: ps
                            .into_iter()
                            .map(|p| NumberDataPoint {
                                attributes: key_values(&p.attributes, self.limit),
                                start_time_unix_nano: b.start_unix_nano,
                                time_unix_nano: b.time_unix_nano,
                                value: Some(number_data_point::Value::AsInt(p.value)),
                                ..Default::default()
                            })
                            .collect(),
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: false,
                    }),
                    Points::Gauge(ps) => metric::Data::Gauge(Gauge {
                        data_points: ps
                            .into_iter()
                            .map(|p| NumberDataPoint {
                                attributes: key_values(&p.attributes, self.limit),
                                time_unix_nano: b.time_unix_nano,
                                value: Some(number_data_point::Value::AsDouble(p.value)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                    Points::Histogram(ps) => metric::Data::Histogram(Histogram {
                        data_points: ps
                            .into_iter()
                            .map(|p| {
                                let key =
                                    format!("{rkey}|{}|{}", m.name, series_key(&p.attributes));
                                if delta {
                                    seen.push(key.clone());
                                    self.hist_delta(key, p, &b)
                                } else {
                                    hist_point(
                                        p,
                                        b.start_unix_nano,
                                        b.time_unix_nano,
                                        true,
                                        self.limit,
                                    )
                                }
                            })
                            .collect(),
                        aggregation_temporality: self.temporality(),
                    }),
                };
                metrics.push(Metric {
                    name: m.name.to_string(),
                    description: m.description.to_string(),
                    unit: m.unit.to_string(),
                    data: Some(data),
                    ..Default::default()
                });
            }
            out.push(ResourceMetrics {
                resource: Some(resource(&self.base, &r.attributes, self.limit)),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(super::attrs::scope()),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            });
        }
        out
    }

    /// Change of a counter since its previous export; a value below the previous one is
    /// a reset (a new series under the same name), reported whole.
    fn counter_delta(&mut self, key: String, now: u64, b: &MetricsBatch) -> (u64, u64) {
        let (value, start) = match self.prev.get(&key) {
            Some((Prev::Counter(p), t)) if now >= *p => (now - p, *t),
            _ => (now, b.start_unix_nano),
        };
        self.prev
            .insert(key, (Prev::Counter(now), b.time_unix_nano));
        (value, start)
    }

    fn hist_delta(&mut self, key: String, p: HistPoint, b: &MetricsBatch) -> HistogramDataPoint {
        let prev = match self.prev.get(&key) {
            Some((
                Prev::Hist {
                    count,
                    sum,
                    buckets,
                },
                t,
            )) if p.count >= *count && buckets.len() == p.bucket_counts.len() => {
                Some((*count, *sum, buckets.clone(), *t))
            }
            _ => None,
        };
        self.prev.insert(
            key,
            (
                Prev::Hist {
                    count: p.count,
                    sum: p.sum,
                    buckets: p.bucket_counts.clone(),
                },
                b.time_unix_nano,
            ),
        );
        match prev {
            None => hist_point(p, b.start_unix_nano, b.time_unix_nano, true, self.limit),
            Some((count, sum, buckets, t)) => {
                let d = HistPoint {
                    count: p.count - count,
                    sum: (p.sum - sum).max(0.0),
                    bucket_counts: p
                        .bucket_counts
                        .iter()
                        .zip(&buckets)
                        .map(|(n, o)| n.saturating_sub(*o))
                        .collect(),
                    ..p
                };
                // The interval's own min/max are unknown: leave them out.
                hist_point(d, t, b.time_unix_nano, false, self.limit)
            }
        }
    }
}

fn hist_point(
    p: HistPoint,
    start: u64,
    time: u64,
    min_max: bool,
    limit: Option<usize>,
) -> HistogramDataPoint {
    let has = min_max && p.count > 0;
    HistogramDataPoint {
        attributes: key_values(&p.attributes, limit),
        start_time_unix_nano: start,
        time_unix_nano: time,
        count: p.count,
        sum: Some(p.sum),
        bucket_counts: p.bucket_counts,
        explicit_bounds: p.bounds,
        min: has.then_some(p.min),
        max: has.then_some(p.max),
        ..Default::default()
    }
}

fn series_key(attrs: &[(String, AttrValue)]) -> String {
    let mut parts: Vec<String> = attrs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.text()))
        .collect();
    parts.sort();
    parts.join(",")
}

impl Encode for MetricsEncoder {
    type Item = MetricsBatch;
    const SIGNAL: Signal = Signal::Metrics;

    fn records(item: &MetricsBatch) -> u64 {
        item.points()
    }

    fn encode(&mut self, items: Vec<MetricsBatch>) -> Encoded {
        let records = items.iter().map(MetricsBatch::points).sum();
        let mut seen = Vec::new();
        let mut resource_metrics = Vec::new();
        for b in items {
            resource_metrics.extend(self.resource_metrics(b, &mut seen));
        }
        if self.temporality == Temporality::Delta {
            // Series that were not reported this time (an ended sandbox) are forgotten.
            let seen: std::collections::HashSet<String> = seen.into_iter().collect();
            self.prev.retain(|k, _| seen.contains(k));
        }
        Encoded {
            body: ExportMetricsServiceRequest { resource_metrics }.encode_to_vec(),
            records,
        }
    }
}

/// Explicit-bucket counts for `bounds` from values given as `(value, count)` runs in
/// ascending order (what an hdrhistogram's recorded-values iterator yields): the helper
/// the agent uses to read its histograms out faithfully.
pub fn bucketize(bounds: &[f64], runs: impl IntoIterator<Item = (f64, u64)>) -> Vec<u64> {
    let mut counts = vec![0u64; bounds.len() + 1];
    for (v, n) in runs {
        let i = bounds.partition_point(|b| *b < v);
        counts[i] += n;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value;

    fn batch(t: u64, invocations: u64, hist_counts: [u64; 3]) -> MetricsBatch {
        let bounds = vec![0.001, 0.01];
        let count = hist_counts.iter().sum();
        MetricsBatch {
            start_unix_nano: 1,
            time_unix_nano: t,
            resources: vec![ResourceIn {
                attributes: vec![
                    ("faas.instance".into(), "f-1".into()),
                    ("faas.max_memory".into(), AttrValue::Int(128 << 20)),
                ],
                metrics: vec![
                    MetricIn {
                        name: "faas.invocations",
                        description: "",
                        unit: "{invocation}",
                        points: Points::Counter(vec![Point {
                            attributes: vec![],
                            value: invocations,
                        }]),
                    },
                    MetricIn {
                        name: "faas.invoke_duration",
                        description: "",
                        unit: "s",
                        points: Points::Histogram(vec![HistPoint {
                            attributes: vec![("faas.coldstart".into(), false.into())],
                            bounds: bounds.clone(),
                            bucket_counts: hist_counts.to_vec(),
                            count,
                            sum: count as f64 * 0.002,
                            min: 0.0005,
                            max: 0.02,
                        }]),
                    },
                    MetricIn {
                        name: "sandscope.sandboxes",
                        description: "",
                        unit: "{sandbox}",
                        points: Points::UpDown(vec![Point {
                            attributes: vec![("state".into(), "idle".into())],
                            value: 2,
                        }]),
                    },
                ],
            }],
        }
    }

    fn cfg(t: Temporality) -> OtlpConfig {
        let mut c = OtlpConfig::new("http://h:1");
        c.temporality = t;
        c.resource = vec![("service.name".into(), "sandscope-agent".into())];
        c
    }

    fn decode(e: Encoded) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest::decode(&e.body[..]).unwrap()
    }

    fn counter(req: &ExportMetricsServiceRequest) -> (i64, u64, i32) {
        let m = &req.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(metric::Data::Sum(s)) = &m.data else {
            panic!("{m:?}")
        };
        let Some(number_data_point::Value::AsInt(v)) = s.data_points[0].value else {
            panic!()
        };
        (
            v,
            s.data_points[0].start_time_unix_nano,
            s.aggregation_temporality,
        )
    }

    fn hist(req: &ExportMetricsServiceRequest) -> HistogramDataPoint {
        let m = &req.resource_metrics[0].scope_metrics[0].metrics[1];
        let Some(metric::Data::Histogram(h)) = &m.data else {
            panic!("{m:?}")
        };
        h.data_points[0].clone()
    }

    #[test]
    fn cumulative_batches_carry_resources_units_and_histograms() {
        let mut e = MetricsEncoder::new(&cfg(Temporality::Cumulative));
        let enc = e.encode(vec![batch(10, 5, [1, 3, 1])]);
        assert_eq!(enc.records, 3);
        let req = decode(enc);
        let rm = &req.resource_metrics[0];
        let keys: Vec<&str> = rm
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|a| a.key.as_str())
            .collect();
        assert_eq!(keys, ["service.name", "faas.instance", "faas.max_memory"]);
        assert_eq!(
            rm.resource.as_ref().unwrap().attributes[2]
                .value
                .as_ref()
                .unwrap()
                .value,
            Some(any_value::Value::IntValue(128 << 20))
        );
        let m = &rm.scope_metrics[0].metrics;
        assert_eq!(
            (m[1].name.as_str(), m[1].unit.as_str()),
            ("faas.invoke_duration", "s")
        );
        assert_eq!(
            counter(&req),
            (5, 1, AggregationTemporality::Cumulative as i32)
        );
        let h = hist(&req);
        assert_eq!(h.bucket_counts, vec![1, 3, 1]);
        assert_eq!(h.explicit_bounds, vec![0.001, 0.01]);
        assert_eq!((h.count, h.min, h.max), (5, Some(0.0005), Some(0.02)));
        let Some(metric::Data::Sum(s)) = &m[2].data else {
            panic!()
        };
        assert!(!s.is_monotonic);
    }

    #[test]
    fn delta_temporality_reports_changes_since_the_previous_export() {
        let mut e = MetricsEncoder::new(&cfg(Temporality::Delta));
        let first = decode(e.encode(vec![batch(10, 5, [1, 3, 1])]));
        assert_eq!(
            counter(&first),
            (5, 1, AggregationTemporality::Delta as i32)
        );
        let second = decode(e.encode(vec![batch(20, 12, [1, 7, 2])]));
        assert_eq!(
            counter(&second),
            (7, 10, AggregationTemporality::Delta as i32)
        );
        let h = hist(&second);
        assert_eq!(h.bucket_counts, vec![0, 4, 1]);
        assert_eq!(h.count, 5);
        assert_eq!((h.start_time_unix_nano, h.time_unix_nano), (10, 20));
        assert_eq!(h.min, None, "an interval's min is not known");
        // A counter that went down is a new series: reported whole.
        let third = decode(e.encode(vec![batch(30, 2, [1, 7, 2])]));
        assert_eq!(counter(&third).0, 2);
        // Up-down counters stay cumulative.
        let m = &third.resource_metrics[0].scope_metrics[0].metrics[2];
        let Some(metric::Data::Sum(s)) = &m.data else {
            panic!()
        };
        assert_eq!(
            s.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        // A series missing from a batch is forgotten, and reported whole when it returns.
        e.encode(vec![MetricsBatch {
            time_unix_nano: 40,
            ..Default::default()
        }]);
        assert!(e.prev.is_empty());
        assert_eq!(
            counter(&decode(e.encode(vec![batch(50, 9, [0, 0, 0])]))).0,
            9
        );
    }

    #[test]
    fn bucketize_puts_values_in_inclusive_upper_bounds() {
        let b = [1.0, 2.0, 4.0];
        assert_eq!(
            bucketize(&b, [(0.5, 1), (1.0, 2), (1.5, 1), (4.0, 1), (9.0, 3)]),
            vec![3, 1, 1, 3]
        );
    }
}
