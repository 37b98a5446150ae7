//! docs/wire.proto is for probes in other languages; it must match the Rust types.
//! This compares every message's (field name, tag) set between the two files.

use std::collections::{BTreeMap, BTreeSet};

type Fields = BTreeMap<String, BTreeSet<(String, u32)>>;

fn rust_fields(src: &str) -> Fields {
    let mut out = Fields::new();
    let mut current: Option<String> = None;
    let mut pending_tag: Option<u32> = None;
    for line in src.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            let name = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('{')
                .to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if line.starts_with("#[prost(")
            && line.contains("tag = \"")
            && !line.contains("oneof")
        {
            let t = line
                .split("tag = \"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            pending_tag = Some(t.parse().unwrap());
        } else if let (Some(tag), Some(rest)) = (pending_tag, line.strip_prefix("pub ")) {
            let field = rest.split(':').next().unwrap().trim().to_string();
            out.get_mut(current.as_ref().unwrap())
                .unwrap()
                .insert((field, tag));
            pending_tag = None;
        } else if line == "}" {
            pending_tag = None;
        }
    }
    out.remove("Frame");
    out
}

fn proto_fields(src: &str) -> Fields {
    let mut out = Fields::new();
    let mut current: Option<String> = None;
    for line in src.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("message ") {
            let name = rest.split_whitespace().next().unwrap().to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
            if line.ends_with("{}") {
                current = None;
            }
        } else if line.starts_with("enum ") || line.starts_with("oneof ") {
            current = if line.starts_with("enum ") {
                None
            } else {
                current
            };
        } else if line == "}" {
            current = None;
        } else if let (Some(msg), Some((lhs, rhs))) = (&current, line.split_once('=')) {
            let field = lhs.split_whitespace().last().unwrap().to_string();
            let tag: u32 = rhs.trim().trim_end_matches(';').trim().parse().unwrap();
            out.get_mut(msg).unwrap().insert((field, tag));
        }
    }
    out.remove("Frame");
    out
}

#[test]
fn proto_doc_matches_rust_messages() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rust = rust_fields(&std::fs::read_to_string(root.join("src/messages.rs")).unwrap());
    let proto = proto_fields(&std::fs::read_to_string(root.join("../docs/wire.proto")).unwrap());
    assert!(
        rust.len() >= 14,
        "parser found too few messages: {:?}",
        rust.keys()
    );
    assert_eq!(
        rust, proto,
        "docs/wire.proto is out of step with wire/src/messages.rs"
    );
}
