//! config/crd/ holds exactly what `crdgen` writes: a changed type without a
//! regenerated CRD fails here, not on a user's cluster.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/crd");
    let mut expected = BTreeSet::new();
    for crd in bowline_api::crds::all() {
        let name = bowline_api::crds::file_name(&crd);
        let path = dir.join(&name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = bowline_api::crds::to_yaml(&crd).expect("CRD serializes");
        assert!(
            committed == generated,
            "{} is stale: run `cargo run -p bowline-api --bin crdgen` and commit the result",
            path.display()
        );
        expected.insert(name);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("config/crd exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present, expected,
        "config/crd holds a CRD no type generates"
    );
}

#[test]
fn crds_parse_back_as_yaml() {
    for crd in bowline_api::crds::all() {
        let yaml = bowline_api::crds::to_yaml(&crd).expect("CRD serializes");
        let parsed: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(&yaml).expect("the YAML parses");
        assert_eq!(parsed, crd, "YAML round trip of {}", crd.spec.names.plural);
    }
}
