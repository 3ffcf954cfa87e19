//! The monitoring port (15014): `/ready`, `/metrics`, `/debug/syncz` (per
//! connected proxy, the push it last ACKed for each type and its last
//! NACK) and `/debug/config_dump?proxy=<id>` (what that proxy would be sent
//! now, as JSON).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::push::{Generated, PUSH_ORDER};
use crate::xds::Discovery;

#[derive(Clone, Debug)]
struct Ops {
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    xds: Discovery,
}

pub fn router(ready: Arc<AtomicBool>, metrics: Arc<Metrics>, xds: Discovery) -> Router {
    Router::new()
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .with_state(Ops {
            ready,
            metrics,
            xds,
        })
}

async fn ready_handler(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics_handler(State(ops): State<Ops>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.encode(),
    )
        .into_response()
}

async fn syncz(State(ops): State<Ops>) -> Response {
    axum::Json(ops.xds.registry.list()).into_response()
}

#[derive(Debug, Deserialize)]
struct DumpQuery {
    proxy: Option<String>,
}

async fn config_dump(State(ops): State<Ops>, Query(query): Query<DumpQuery>) -> Response {
    let Some(id) = query.proxy else {
        return (
            StatusCode::BAD_REQUEST,
            "name a connected proxy: /debug/config_dump?proxy=<node id> (see /debug/syncz)",
        )
            .into_response();
    };
    let Some(proxy) = ops.xds.connected(&id) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no proxy {id} is connected (see /debug/syncz)"),
        )
            .into_response();
    };
    axum::Json(dump(&ops.xds.config_for(&proxy))).into_response()
}

/// Resources by type, each with its name and version and the resource as
/// protobuf JSON would name its type.
fn dump(generated: &Generated) -> serde_json::Value {
    let mut types = serde_json::Map::new();
    for type_url in PUSH_ORDER {
        let resources: Vec<serde_json::Value> = generated
            .of_type(type_url)
            .map(|(name, v)| {
                serde_json::json!({
                    "name": name.as_ref(),
                    "version": v.version,
                    "@type": v.resource.type_url,
                    "bytes": v.resource.value.len(),
                })
            })
            .collect();
        if !resources.is_empty() {
            types.insert(type_url.to_string(), resources.into());
        }
    }
    serde_json::Value::Object(types)
}
