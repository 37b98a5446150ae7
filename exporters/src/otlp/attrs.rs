//! Attribute values as the agent hands them over, and their OTLP form (with an optional
//! value-length limit, as backends such as New Relic impose).

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// One attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string.
    Str(String),
    /// An integer (`faas.max_memory` in bytes, ...).
    Int(i64),
    /// A boolean (`faas.coldstart`).
    Bool(bool),
    /// A float.
    F64(f64),
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_string())
    }
}

impl From<bool> for AttrValue {
    fn from(b: bool) -> Self {
        AttrValue::Bool(b)
    }
}

impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}

impl AttrValue {
    /// A stable text form (series identity for delta temporality).
    pub fn text(&self) -> String {
        match self {
            AttrValue::Str(s) => s.clone(),
            AttrValue::Int(v) => v.to_string(),
            AttrValue::Bool(b) => b.to_string(),
            AttrValue::F64(v) => v.to_string(),
        }
    }
}

/// A list of attributes.
pub type Attrs = Vec<(String, AttrValue)>;

/// Cut `s` to at most `limit` bytes at a char boundary.
pub fn truncate(mut s: String, limit: Option<usize>) -> String {
    if let Some(max) = limit {
        if s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
    }
    s
}

/// The OTLP form of one attribute; string values longer than `limit` bytes are cut.
pub fn key_value(key: &str, value: &AttrValue, limit: Option<usize>) -> KeyValue {
    let v = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(truncate(s.clone(), limit)),
        AttrValue::Int(i) => any_value::Value::IntValue(*i),
        AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
        AttrValue::F64(f) => any_value::Value::DoubleValue(*f),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

/// The OTLP form of a list of attributes.
pub fn key_values(attrs: &[(String, AttrValue)], limit: Option<usize>) -> Vec<KeyValue> {
    attrs.iter().map(|(k, v)| key_value(k, v, limit)).collect()
}

/// The instrumentation scope of everything sandscope exports.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "sandscope".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// A resource from the agent's base attributes followed by `extra` (a sandbox's).
pub fn resource(
    base: &[(String, String)],
    extra: &[(String, AttrValue)],
    limit: Option<usize>,
) -> Resource {
    let mut attributes: Vec<KeyValue> = base
        .iter()
        .map(|(k, v)| key_value(k, &AttrValue::Str(v.clone()), limit))
        .collect();
    attributes.extend(key_values(extra, limit));
    Resource {
        attributes,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_types_and_long_strings_are_cut_at_a_char_boundary() {
        let kv = key_value("faas.max_memory", &AttrValue::Int(134_217_728), None);
        assert_eq!(
            kv.value.unwrap().value,
            Some(any_value::Value::IntValue(134_217_728))
        );
        let kv = key_value("x", &AttrValue::Str("aé€b".into()), Some(4));
        // "a" (1) + "é" (2) = 3 bytes; the euro sign would cross the limit.
        assert_eq!(
            kv.value.unwrap().value,
            Some(any_value::Value::StringValue("aé".into()))
        );
        let r = resource(
            &[("service.name".into(), "s".into())],
            &[("faas.coldstart".into(), AttrValue::Bool(true))],
            None,
        );
        assert_eq!(r.attributes.len(), 2);
        assert_eq!(r.attributes[1].key, "faas.coldstart");
    }
}
