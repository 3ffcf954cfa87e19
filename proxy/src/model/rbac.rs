//! Envoy's RBAC filters (HTTP, and network for TCP ports), which carry
//! AuthorizationPolicy: a set of
//! named policies, each matching when one of its permissions (what is
//! asked: method, path, host, port, headers) and one of its principals
//! (who asks: the peer's SPIFFE ID, namespace, IP, headers) match. An
//! ALLOW filter lets through what some policy matches, a DENY filter stops
//! it, a LOG filter only records. Filters run in order, so the control
//! plane's DENY comes before its ALLOW.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{self as envoy, permission, principal, rbac};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbacFilter;
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, path_matcher};
use http::{HeaderMap, Method, Uri};

use crate::model::route::{HeaderMatch, ValueTest, string_test};

pub const RBAC_FILTER: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
pub const NETWORK_RBAC_FILTER: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";

#[derive(Debug)]
pub struct Rbac {
    action: Action,
    /// By name, in name order (the policy reported is the first matched).
    policies: Vec<(String, Policy)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Log,
}

#[derive(Debug)]
struct Policy {
    permissions: Vec<Permission>,
    principals: Vec<Principal>,
}

#[derive(Debug)]
enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatch),
    Path(ValueTest),
    DestinationPort(u16),
    DestinationIp(Cidr),
}

#[derive(Debug)]
enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A peer certificate; its SPIFFE ID tested when a matcher is given.
    Authenticated(Option<ValueTest>),
    /// The connection's peer address.
    DirectRemoteIp(Cidr),
    /// The original client (the peer, unless a trusted hop said otherwise).
    RemoteIp(Cidr),
    Header(HeaderMatch),
    Path(ValueTest),
}

#[derive(Debug)]
struct Cidr(ipnet::IpNet);

/// What a request or connection is judged on.
#[derive(Debug)]
pub struct Subject<'a> {
    /// The request; none for a connection judged by a network filter,
    /// where header and path rules match nothing.
    pub request: Option<Asked<'a>>,
    /// The peer's SPIFFE ID, when it came over mutual TLS.
    pub principal: Option<&'a str>,
    /// Whether the peer presented a verified certificate.
    pub authenticated: bool,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// What an HTTP request asks.
#[derive(Clone, Copy, Debug)]
pub struct Asked<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// A filter's verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Denied, with the policy that denied it (none when an ALLOW filter
    /// matched nothing).
    Denied(Option<String>),
}

impl Rbac {
    /// From the filter's configuration; `None` when it enforces nothing
    /// (no `rules`). An error names the field.
    pub fn from_envoy(filter: &RbacFilter) -> Result<Option<Self>, (String, String)> {
        Self::from_rules(filter.rules.as_ref())
    }

    /// From a network RBAC filter (on a TCP chain), as
    /// [`Rbac::from_envoy`].
    pub fn from_network(filter: &NetworkRbacFilter) -> Result<Option<Self>, (String, String)> {
        Self::from_rules(filter.rules.as_ref())
    }

    fn from_rules(rules: Option<&envoy::Rbac>) -> Result<Option<Self>, (String, String)> {
        let Some(rules) = rules else {
            return Ok(None);
        };
        let action = match rbac::Action::try_from(rules.action) {
            Ok(rbac::Action::Allow) => Action::Allow,
            Ok(rbac::Action::Deny) => Action::Deny,
            Ok(rbac::Action::Log) => Action::Log,
            _ => {
                return Err((
                    "rules.action".into(),
                    format!("unknown action {}", rules.action),
                ));
            }
        };
        let mut names: Vec<&String> = rules.policies.keys().collect();
        names.sort();
        let mut policies = Vec::new();
        for name in names {
            let policy = &rules.policies[name];
            let at = |f: &str| format!("rules.policies[{name}].{f}");
            if policy.condition.is_some() || policy.checked_condition.is_some() {
                return Err((at("condition"), "CEL conditions are not supported".into()));
            }
            policies.push((
                name.clone(),
                Policy {
                    permissions: policy
                        .permissions
                        .iter()
                        .map(permission)
                        .collect::<Result<_, _>>()
                        .map_err(|e| (at("permissions"), e))?,
                    principals: policy
                        .principals
                        .iter()
                        .map(principal)
                        .collect::<Result<_, _>>()
                        .map_err(|e| (at("principals"), e))?,
                },
            ));
        }
        Ok(Some(Self { action, policies }))
    }

    pub fn judge(&self, subject: &Subject<'_>) -> Verdict {
        let matched = self
            .policies
            .iter()
            .find(|(_, p)| {
                p.permissions.iter().any(|x| x.matches(subject))
                    && p.principals.iter().any(|x| x.matches(subject))
            })
            .map(|(name, _)| name);
        match (self.action, matched) {
            (Action::Allow, Some(_)) | (Action::Deny, None) | (Action::Log, _) => Verdict::Allowed,
            (Action::Allow, None) => Verdict::Denied(None),
            (Action::Deny, Some(name)) => Verdict::Denied(Some(name.clone())),
        }
    }
}

fn permission(p: &envoy::Permission) -> Result<Permission, String> {
    use permission::Rule;
    Ok(match &p.rule {
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::AndRules(set)) => {
            Permission::And(set.rules.iter().map(permission).collect::<Result<_, _>>()?)
        }
        Some(Rule::OrRules(set)) => {
            Permission::Or(set.rules.iter().map(permission).collect::<Result<_, _>>()?)
        }
        Some(Rule::NotRule(inner)) => Permission::Not(Box::new(permission(inner)?)),
        Some(Rule::Header(h)) => Permission::Header(HeaderMatch::from_envoy(h)?),
        Some(Rule::UrlPath(path)) => Permission::Path(path_test(path)?),
        Some(Rule::DestinationPort(port)) => Permission::DestinationPort(
            u16::try_from(*port).map_err(|_| format!("destination_port {port} is out of range"))?,
        ),
        Some(Rule::DestinationIp(cidr)) => Permission::DestinationIp(Cidr::from_envoy(cidr)?),
        Some(_) => {
            return Err("only any, and_rules, or_rules, not_rule, header, url_path, destination_port and destination_ip permissions are supported".into());
        }
        None => return Err("an empty permission".into()),
    })
}

fn principal(p: &envoy::Principal) -> Result<Principal, String> {
    use principal::Identifier;
    #[allow(deprecated)] // `source_ip`, which Envoy still reads.
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::AndIds(set)) => {
            Principal::And(set.ids.iter().map(principal).collect::<Result<_, _>>()?)
        }
        Some(Identifier::OrIds(set)) => {
            Principal::Or(set.ids.iter().map(principal).collect::<Result<_, _>>()?)
        }
        Some(Identifier::NotId(inner)) => Principal::Not(Box::new(principal(inner)?)),
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(
            a.principal_name.as_ref().map(string_test).transpose()?,
        ),
        Some(Identifier::DirectRemoteIp(cidr)) | Some(Identifier::SourceIp(cidr)) => {
            Principal::DirectRemoteIp(Cidr::from_envoy(cidr)?)
        }
        Some(Identifier::RemoteIp(cidr)) => Principal::RemoteIp(Cidr::from_envoy(cidr)?),
        Some(Identifier::Header(h)) => Principal::Header(HeaderMatch::from_envoy(h)?),
        Some(Identifier::UrlPath(path)) => Principal::Path(path_test(path)?),
        Some(_) => return Err("only any, and_ids, or_ids, not_id, authenticated, direct_remote_ip, remote_ip, source_ip, header and url_path principals are supported".into()),
        None => return Err("an empty principal".into()),
    })
}

fn path_test(path: &PathMatcher) -> Result<ValueTest, String> {
    match &path.rule {
        Some(path_matcher::Rule::Path(matcher)) => string_test(matcher),
        None => Err("an empty path matcher".into()),
    }
}

impl Cidr {
    fn from_envoy(cidr: &CidrRange) -> Result<Self, String> {
        let ip: IpAddr = cidr
            .address_prefix
            .parse()
            .map_err(|_| format!("{:?} is not an IP address", cidr.address_prefix))?;
        let full = if ip.is_ipv4() { 32 } else { 128 };
        let len = cidr
            .prefix_len
            .as_ref()
            .map_or(full, |l| l.value.min(full as u32) as u8);
        ipnet::IpNet::new(ip, len)
            .map(|net| Self(net.trunc()))
            .map_err(|e| e.to_string())
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl Permission {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(s)),
            Permission::Or(any) => any.iter().any(|p| p.matches(s)),
            Permission::Not(inner) => !inner.matches(s),
            Permission::Header(h) => s
                .request
                .is_some_and(|r| h.matches(r.method, r.uri, r.headers)),
            Permission::Path(test) => s.request.is_some_and(|r| test.matches(Some(r.uri.path()))),
            Permission::DestinationPort(port) => s.local.port() == *port,
            Permission::DestinationIp(cidr) => cidr.contains(s.local.ip()),
        }
    }
}

impl Principal {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(s)),
            Principal::Or(any) => any.iter().any(|p| p.matches(s)),
            Principal::Not(inner) => !inner.matches(s),
            Principal::Authenticated(None) => s.authenticated,
            Principal::Authenticated(Some(test)) => {
                s.authenticated && s.principal.is_some() && test.matches(s.principal)
            }
            Principal::DirectRemoteIp(cidr) | Principal::RemoteIp(cidr) => {
                cidr.contains(s.peer.ip())
            }
            Principal::Header(h) => s
                .request
                .is_some_and(|r| h.matches(r.method, r.uri, r.headers)),
            Principal::Path(test) => s.request.is_some_and(|r| test.matches(Some(r.uri.path()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::from_json;
    use serde_json::json;

    fn filter(action: &str, policies: serde_json::Value) -> Rbac {
        let config: RbacFilter =
            from_json(json!({"rules": {"action": action, "policies": policies}})).unwrap();
        Rbac::from_envoy(&config).unwrap().unwrap()
    }

    fn judge(rbac: &Rbac, principal: Option<&str>, method: &str, path: &str) -> Verdict {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = path.parse().unwrap();
        let headers = HeaderMap::new();
        rbac.judge(&Subject {
            request: Some(Asked {
                method: &method,
                uri: &uri,
                headers: &headers,
            }),
            principal,
            authenticated: principal.is_some(),
            peer: "10.0.0.7:40000".parse().unwrap(),
            local: "10.0.0.9:8080".parse().unwrap(),
        })
    }

    const BILLING: &str = "spiffe://cluster.local/ns/shop/sa/billing";

    #[test]
    fn allow_lets_through_only_what_a_policy_matches() {
        let rbac = filter(
            "ALLOW",
            json!({"ns[shop]-policy[payments]-rule[0]": {
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    {"authenticated": {"principal_name": {"exact": BILLING}}}]}}]}}],
                "permissions": [{"and_rules": {"rules": [
                    {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": "POST"}}}]}},
                    {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/pay"}}}]}},
                ]}}],
            }}),
        );
        assert_eq!(
            judge(&rbac, Some(BILLING), "POST", "/pay?x=1"),
            Verdict::Allowed
        );
        assert_eq!(
            judge(&rbac, Some(BILLING), "GET", "/pay"),
            Verdict::Denied(None)
        );
        assert_eq!(
            judge(
                &rbac,
                Some("spiffe://cluster.local/ns/shop/sa/orders"),
                "POST",
                "/pay"
            ),
            Verdict::Denied(None)
        );
        assert_eq!(judge(&rbac, None, "POST", "/pay"), Verdict::Denied(None));
    }

    #[test]
    fn deny_stops_what_a_policy_matches_and_names_it() {
        let rbac = filter(
            "DENY",
            json!({"deny-outside": {
                "principals": [{"not_id": {"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 24}}}],
                "permissions": [{"any": true}],
            }, "deny-admin": {
                "principals": [{"any": true}],
                "permissions": [{"url_path": {"path": {"exact": "/admin"}}}],
            }}),
        );
        assert_eq!(judge(&rbac, None, "GET", "/"), Verdict::Allowed);
        assert_eq!(
            judge(&rbac, None, "GET", "/admin"),
            Verdict::Denied(Some("deny-admin".into()))
        );
    }

    #[test]
    fn unsupported_rules_name_the_policy() {
        let config: RbacFilter = from_json(json!({"rules": {"action": "ALLOW", "policies": {"p": {
            "principals": [{"any": true}],
            "permissions": [{"metadata": {"filter": "x", "path": [{"key": "y"}], "value": {"present_match": true}}}],
        }}}}))
        .unwrap();
        let (field, message) = Rbac::from_envoy(&config).unwrap_err();
        assert_eq!(field, "rules.policies[p].permissions");
        assert!(message.contains("are supported"), "{message}");
    }
}
