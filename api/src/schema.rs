//! Schema helpers for fields whose full OpenAPI schema would make a CRD too
//! large for the API server (etcd stores objects of at most 1.5 MiB, and
//! Kubernetes' own types such as Affinity expand to thousands of lines each
//! time they appear). Such fields are still typed in Rust, so the operator
//! checks them when it reads the object and reports the field by name.

use schemars::{Schema, SchemaGenerator, json_schema};

/// Any JSON object, kept as written.
pub fn any_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A list of JSON objects, kept as written.
pub fn list_of_any_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}
