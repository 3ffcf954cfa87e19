//! Every Istio example under config/samples/istio/ reads into Bowline's
//! types and writes back the same: no field is misnamed, dropped or
//! reshaped, so the Istio YAML users have means what it meant.

use std::path::Path;

use bowline_api::networking::{DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService};
use bowline_api::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn round_trip<K: DeserializeOwned + Serialize>(document: &Value) -> Value {
    let typed: K = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", document["metadata"]["name"]));
    serde_json::to_value(typed).expect("serializes")
}

/// Numbers compared by value: `25` written back as `25.0` is the same.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.fract() == 0.0)
            .map_or_else(|| value.clone(), |f| Value::from(f as i64)),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn istio_samples_read_and_write_back_unchanged() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/istio");
    let mut kinds = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("the samples") {
        let path = entry.expect("an entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for document in documents {
            let kind = document["kind"].as_str().expect("a kind").to_string();
            let written = match kind.as_str() {
                "VirtualService" => round_trip::<VirtualService>(&document),
                "DestinationRule" => round_trip::<DestinationRule>(&document),
                "Gateway" => round_trip::<Gateway>(&document),
                "ServiceEntry" => round_trip::<ServiceEntry>(&document),
                "Sidecar" => round_trip::<Sidecar>(&document),
                "PeerAuthentication" => round_trip::<PeerAuthentication>(&document),
                "AuthorizationPolicy" => round_trip::<AuthorizationPolicy>(&document),
                "RequestAuthentication" => round_trip::<RequestAuthentication>(&document),
                other => panic!("{}: unexpected kind {other}", path.display()),
            };
            assert_eq!(
                normalized(&written["spec"]),
                normalized(&document["spec"]),
                "{} {}: the spec changed on the way through the types",
                path.display(),
                document["metadata"]["name"]
            );
            kinds.insert(kind);
        }
    }
    assert_eq!(kinds.len(), 8, "every kind has an example: {kinds:?}");
}
