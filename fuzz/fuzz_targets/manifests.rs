//! A manifest file of the standalone source: YAML (several documents) or
//! JSON, `List`s and typed lists, each object of the kinds Tern reads
//! converted to the model (Services, EndpointSlices, Nodes, Namespaces,
//! Pods, NetworkPolicies).
//!
//! Input: one byte choosing the reader (even: YAML, odd: JSON, as the
//! file's extension does), then the file's text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_agent::sources::manifests::file::{FileObjects, read_documents};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // The source reads files with read_to_string: not UTF-8 is refused
    // before any parsing.
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let json = mode & 1 == 1;
    let mut objects = FileObjects::default();
    let outcome = read_documents(text, json, "fuzz.yaml", &mut objects);
    if let Err(e) = &outcome {
        assert!(!e.is_empty());
    }
    for warning in &objects.warnings {
        assert!(!warning.is_empty());
    }
});
