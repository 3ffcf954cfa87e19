//! What a route and a cluster say about failure: a route's retries, fault
//! injection and mirrors; a cluster's circuit-breaker limits and outlier
//! detection. Converted from Envoy's messages as Envoy reads them,
//! defaults included.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection};
use envoy_types::pb::envoy::config::route::v3 as envoy;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use http::StatusCode;

use super::duration;

/// A share of requests, in parts per million.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerMillion(pub u32);

impl PerMillion {
    pub const ALL: Self = Self(1_000_000);

    pub fn from_envoy(percent: Option<&FractionalPercent>) -> Self {
        let Some(p) = percent else {
            return Self::ALL;
        };
        let scale = match fractional_percent::DenominatorType::try_from(p.denominator) {
            Ok(fractional_percent::DenominatorType::TenThousand) => 100,
            Ok(fractional_percent::DenominatorType::Million) => 1,
            _ => 10_000,
        };
        Self(p.numerator.saturating_mul(scale).min(1_000_000))
    }

    /// Whether this request is among the share, by a roll in 0..1,000,000.
    pub fn hit(self, roll: u32) -> bool {
        roll < self.0
    }
}

/// Envoy's `retry_on` conditions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, and connection failures, resets and per-try timeouts.
    pub server_error: bool,
    /// 502, 503 and 504, and connection failures and timeouts.
    pub gateway_error: bool,
    pub connect_failure: bool,
    /// A reset or disconnect before the response headers, or a timeout.
    pub reset: bool,
    pub refused_stream: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// The policy's `retriable_status_codes`.
    pub status_codes: bool,
    /// gRPC statuses in the response headers (trailers-only answers).
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_internal: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
}

impl RetryOn {
    fn parse(text: &str) -> Result<Self, String> {
        let mut on = Self::default();
        for condition in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let flag = match condition {
                "5xx" => &mut on.server_error,
                "gateway-error" => &mut on.gateway_error,
                "connect-failure" => &mut on.connect_failure,
                "reset" | "reset-before-request" => &mut on.reset,
                "refused-stream" => &mut on.refused_stream,
                "retriable-4xx" => &mut on.retriable_4xx,
                "retriable-status-codes" => &mut on.status_codes,
                "cancelled" => &mut on.grpc_cancelled,
                "deadline-exceeded" => &mut on.grpc_deadline_exceeded,
                "internal" => &mut on.grpc_internal,
                "resource-exhausted" => &mut on.grpc_resource_exhausted,
                "unavailable" => &mut on.grpc_unavailable,
                // Envoy's conditions on headers and HTTP/3 have nothing to
                // act on here; they never match.
                "retriable-headers" | "http3-post-connect-failure" => continue,
                other => return Err(format!("unknown retry condition {other:?}")),
            };
            *flag = true;
        }
        Ok(on)
    }
}

/// How one attempt ended, as far as retrying goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A response with this status and, if any, `grpc-status` header.
    Answered(StatusCode, Option<u32>),
    ConnectFailure,
    /// Reset or disconnected before the response headers.
    Reset,
    RefusedStream,
    /// The per-try timeout fired.
    TimedOut,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub codes: Vec<u16>,
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// Retry on another endpoint than those tried, when there is one.
    pub other_hosts: bool,
    /// Backoff between attempts (Envoy: 25 ms base, ten times that max).
    pub base_interval: Duration,
    pub max_interval: Duration,
}

impl RetryPolicy {
    pub fn from_envoy(policy: &envoy::RetryPolicy) -> Result<Self, (String, String)> {
        let on = RetryOn::parse(&policy.retry_on).map_err(|e| ("retry_on".to_string(), e))?;
        let base_interval = policy
            .retry_back_off
            .as_ref()
            .and_then(|b| b.base_interval.as_ref())
            .map_or(Duration::from_millis(25), duration);
        let max_interval = policy
            .retry_back_off
            .as_ref()
            .and_then(|b| b.max_interval.as_ref())
            .map_or(base_interval * 10, duration);
        Ok(Self {
            on,
            codes: policy
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            retries: policy.num_retries.as_ref().map_or(1, |n| n.value),
            per_try_timeout: policy
                .per_try_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            // Envoy's previous_hosts predicate; host_selection_retry_max_attempts
            // alone selects nothing.
            other_hosts: policy
                .retry_host_predicate
                .iter()
                .any(|p| p.name.contains("previous_hosts")),
            base_interval,
            max_interval,
        })
    }

    /// Whether an attempt that ended so is worth another.
    pub fn retries_on(&self, attempt: Attempt) -> bool {
        let on = &self.on;
        match attempt {
            Attempt::ConnectFailure => {
                on.connect_failure || on.server_error || on.gateway_error || on.reset
            }
            Attempt::Reset => on.server_error || on.reset,
            Attempt::RefusedStream => on.refused_stream || on.server_error || on.reset,
            Attempt::TimedOut => on.server_error || on.gateway_error || on.reset,
            Attempt::Answered(status, grpc) => {
                let code = status.as_u16();
                (on.server_error && status.is_server_error())
                    || (on.gateway_error && matches!(code, 502..=504))
                    || (on.retriable_4xx && code == 409)
                    || (on.status_codes && self.codes.contains(&code))
                    || grpc.is_some_and(|g| {
                        (on.grpc_cancelled && g == 1)
                            || (on.grpc_deadline_exceeded && g == 4)
                            || (on.grpc_resource_exhausted && g == 8)
                            || (on.grpc_internal && g == 13)
                            || (on.grpc_unavailable && g == 14)
                    })
            }
        }
    }
}

/// A route's fault injection (`envoy.filters.http.fault`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(Duration, PerMillion)>,
    pub abort: Option<(Abort, PerMillion)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status, answered as HTTP 200 with `grpc-status`.
    Grpc(u32),
}

impl Fault {
    pub fn from_envoy(fault: &HttpFault) -> Result<Self, (String, String)> {
        let delay = match &fault.delay {
            Some(delay) => match &delay.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(d)) => Some((
                    duration(d),
                    PerMillion::from_envoy(delay.percentage.as_ref()),
                )),
                _ => {
                    return Err(("delay".into(), "only fixed_delay is supported".into()));
                }
            },
            None => None,
        };
        let abort = match &fault.abort {
            Some(abort) => {
                let what = match &abort.error_type {
                    Some(fault_abort::ErrorType::HttpStatus(code)) => Abort::Http(
                        u16::try_from(*code)
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .filter(|s| s.as_u16() >= 200)
                            .ok_or_else(|| {
                                (
                                    "abort.http_status".to_string(),
                                    format!("{code} is not an HTTP status"),
                                )
                            })?,
                    ),
                    Some(fault_abort::ErrorType::GrpcStatus(code)) => Abort::Grpc(*code),
                    _ => {
                        return Err((
                            "abort".into(),
                            "an http_status or grpc_status is needed".into(),
                        ));
                    }
                };
                Some((what, PerMillion::from_envoy(abort.percentage.as_ref())))
            }
            None => None,
        };
        Ok(Self { delay, abort })
    }
}

/// A copy of each request sent to another cluster, its answer ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub cluster: String,
    pub share: PerMillion,
}

impl Mirror {
    pub fn from_envoy(policy: &envoy::route_action::RequestMirrorPolicy) -> Self {
        Self {
            cluster: policy.cluster.clone(),
            share: PerMillion::from_envoy(
                policy
                    .runtime_fraction
                    .as_ref()
                    .and_then(|f| f.default_value.as_ref()),
            ),
        }
    }
}

/// A cluster's circuit breakers (the default priority's thresholds).
/// Envoy's defaults: 1,024 connections, pending requests and requests, 3
/// retries at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// Retries at once relative to the requests in flight; replaces
    /// `max_retries` when set.
    pub retry_budget: Option<RetryBudget>,
}

/// Envoy's retry budget: retries at once may be `share` of the requests
/// active and pending, and at least `min_concurrency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBudget {
    pub share: PerMillion,
    pub min_concurrency: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

impl Limits {
    pub fn from_envoy(breakers: Option<&CircuitBreakers>) -> Self {
        let defaults = Self::default();
        // The DEFAULT priority (0); HIGH is not routed to here.
        let Some(t) = breakers.and_then(|b| b.thresholds.iter().find(|t| t.priority == 0)) else {
            return defaults;
        };
        let or = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
            v.as_ref().map_or(d, |v| v.value)
        };
        Self {
            max_connections: or(&t.max_connections, defaults.max_connections),
            max_pending_requests: or(&t.max_pending_requests, defaults.max_pending_requests),
            max_requests: or(&t.max_requests, defaults.max_requests),
            max_retries: or(&t.max_retries, defaults.max_retries),
            // Envoy's defaults for what the budget leaves unset: 20 %, 3.
            retry_budget: t.retry_budget.as_ref().map(|b| RetryBudget {
                share: PerMillion(b.budget_percent.as_ref().map_or(200_000, |p| {
                    (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u32
                })),
                min_concurrency: or(&b.min_retry_concurrency, 3),
            }),
        }
    }

    /// How many retries may be under way at once while `requests` are
    /// active or pending.
    pub fn retries_allowed(&self, requests: u32) -> u32 {
        match self.retry_budget {
            Some(budget) => {
                let share = u64::from(requests) * u64::from(budget.share.0) / 1_000_000;
                (share as u32).max(budget.min_concurrency)
            }
            None => self.max_retries,
        }
    }
}

/// Passive health checking: endpoints ejected after consecutive failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive 5xx (and local failures) that eject; 0: never.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and local failures) that eject; 0: never.
    pub consecutive_gateway: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Each interval an endpoint spends back in service takes one off its
    /// ejection count, so the next ejection is shorter again.
    pub interval: Duration,
}

impl Outlier {
    /// Envoy's defaults for what is unset: 5 consecutive 5xx enforced,
    /// gateway failures counted but not enforced, 30 s base ejection, at
    /// most 300 s, 10 % of the endpoints, a 10 s interval.
    pub fn from_envoy(detection: &OutlierDetection) -> Self {
        let value = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
            v.as_ref().map_or(d, |v| v.value)
        };
        let enforced = |count: u32, enforcing: u32| if enforcing > 0 { count } else { 0 };
        Self {
            consecutive_5xx: enforced(
                value(&detection.consecutive_5xx, 5),
                value(&detection.enforcing_consecutive_5xx, 100),
            ),
            consecutive_gateway: enforced(
                value(&detection.consecutive_gateway_failure, 5),
                value(&detection.enforcing_consecutive_gateway_failure, 0),
            ),
            base_ejection_time: detection
                .base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), duration),
            max_ejection_time: detection
                .max_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(300), duration),
            max_ejection_percent: value(&detection.max_ejection_percent, 10).min(100),
            interval: detection
                .interval
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(json: serde_json::Value) -> RetryPolicy {
        RetryPolicy::from_envoy(&crate::envoy::from_json(json).unwrap()).unwrap()
    }

    #[test]
    fn retry_conditions_read_as_envoy_defines_them() {
        let policy = retry(serde_json::json!({
            "retry_on": "gateway-error,connect-failure,retriable-status-codes,unavailable",
            "num_retries": 3, "per_try_timeout": "0.5s", "retriable_status_codes": [418],
            "host_selection_retry_max_attempts": 5,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        }));
        assert_eq!(policy.retries, 3);
        assert_eq!(policy.per_try_timeout, Some(Duration::from_millis(500)));
        assert!(policy.other_hosts);
        assert!(
            !retry(serde_json::json!({"retry_on": "5xx", "host_selection_retry_max_attempts": 5}))
                .other_hosts,
            "without the previous_hosts predicate a retry may go to any endpoint"
        );
        let answered =
            |code: u16, grpc| Attempt::Answered(StatusCode::from_u16(code).unwrap(), grpc);
        assert!(policy.retries_on(answered(503, None)));
        assert!(
            !policy.retries_on(answered(500, None)),
            "500 is not a gateway error"
        );
        assert!(policy.retries_on(answered(418, None)));
        assert!(
            policy.retries_on(answered(200, Some(14))),
            "grpc unavailable"
        );
        assert!(!policy.retries_on(answered(200, Some(13))));
        assert!(policy.retries_on(Attempt::ConnectFailure));
        assert!(policy.retries_on(Attempt::TimedOut));
        assert!(!policy.retries_on(Attempt::Reset));
        let five = retry(serde_json::json!({"retry_on": "5xx"}));
        assert_eq!(five.retries, 1, "Envoy's default is one retry");
        assert!(five.retries_on(answered(500, None)) && five.retries_on(Attempt::Reset));
        let error = RetryPolicy::from_envoy(
            &crate::envoy::from_json(serde_json::json!({"retry_on": "5xx,sometimes"})).unwrap(),
        )
        .unwrap_err();
        assert_eq!(error.0, "retry_on");
    }

    #[test]
    fn faults_take_their_share() {
        let fault: HttpFault = crate::envoy::from_json(serde_json::json!({
            "delay": {"fixed_delay": "5s", "percentage": {"numerator": 25, "denominator": "HUNDRED"}},
            "abort": {"http_status": 503, "percentage": {"numerator": 100000, "denominator": "MILLION"}},
        }))
        .unwrap();
        let fault = Fault::from_envoy(&fault).unwrap();
        assert_eq!(
            fault.delay,
            Some((Duration::from_secs(5), PerMillion(250_000)))
        );
        assert_eq!(
            fault.abort,
            Some((
                Abort::Http(StatusCode::SERVICE_UNAVAILABLE),
                PerMillion(100_000)
            ))
        );
        assert!(PerMillion(250_000).hit(249_999) && !PerMillion(250_000).hit(250_000));
    }

    #[test]
    fn limits_and_outlier_detection_default_as_envoy() {
        assert_eq!(Limits::from_envoy(None), Limits::default());
        let breakers: CircuitBreakers = crate::envoy::from_json(serde_json::json!({
            "thresholds": [{"max_connections": 1, "max_pending_requests": 1}],
        }))
        .unwrap();
        let limits = Limits::from_envoy(Some(&breakers));
        assert_eq!(
            (
                limits.max_connections,
                limits.max_pending_requests,
                limits.max_requests
            ),
            (1, 1, 1024)
        );
        assert_eq!(limits.retries_allowed(100), 3, "max_retries, by default");
        let outlier: OutlierDetection = crate::envoy::from_json(serde_json::json!({
            "consecutive_5xx": 2, "base_ejection_time": "1s", "max_ejection_percent": 100,
        }))
        .unwrap();
        let outlier = Outlier::from_envoy(&outlier);
        assert_eq!(outlier.consecutive_5xx, 2);
        assert_eq!(outlier.consecutive_gateway, 0, "not enforced by default");
        assert_eq!(outlier.base_ejection_time, Duration::from_secs(1));
        assert_eq!(outlier.max_ejection_percent, 100);
    }

    #[test]
    fn a_retry_budget_replaces_max_retries() {
        let limits = |thresholds: serde_json::Value| {
            let breakers: CircuitBreakers =
                crate::envoy::from_json(serde_json::json!({"thresholds": [thresholds]})).unwrap();
            Limits::from_envoy(Some(&breakers))
        };
        let budget = limits(serde_json::json!({"max_retries": 1,
            "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 2}}));
        // A quarter of those in flight, and never fewer than two.
        assert_eq!(budget.retries_allowed(100), 25);
        assert_eq!(budget.retries_allowed(10), 2);
        assert_eq!(budget.retries_allowed(0), 2);
        // Envoy's defaults: 20 %, at least 3.
        let defaults = limits(serde_json::json!({"retry_budget": {}}));
        assert_eq!(defaults.retries_allowed(50), 10);
        assert_eq!(defaults.retries_allowed(5), 3);
        // None at all.
        let none = limits(serde_json::json!({
            "retry_budget": {"budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}}));
        assert_eq!(none.retries_allowed(1_000), 0);
    }
}
