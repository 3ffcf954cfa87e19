//! AuthorizationPolicy as Envoy's RBAC filters on a workload's inbound, in
//! Istio's order: AUDIT (logs), then DENY, then ALLOW — HTTP filters on
//! HTTP ports, network filters on TCP ports.
//!
//! A TCP connection has no method, path, host, header or request
//! principal: as Istio does, a rule asking for one of those is ignored in
//! an ALLOW policy (it allows nothing on TCP), and in a DENY or AUDIT
//! policy it applies without those fields (denying more, never less).
//!
//! Which policies apply: those of the mesh's root namespace and the
//! workload's namespace, without a selector or with one matching the
//! workload's labels. DENY is checked before ALLOW; with no ALLOW policy
//! everything not denied is allowed; an ALLOW policy with no rules allows
//! nothing (deny all). A rule matches when one of its `from` sources, one
//! of its `to` operations and all of its `when` conditions match; within
//! one source or operation every field set must match (one of its values),
//! and `not*` fields must match none.

use std::collections::HashMap;

use bowline_api::security::{Action, AuthorizationPolicySpec, Condition, Operation, Rule, Source};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac as RbacRules, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::model::{Config, Proxy, Snapshot, selects};

/// The RBAC HTTP filters for the workload behind `proxy`, in the order
/// they run; empty when no policy applies.
pub fn filters(snapshot: &Snapshot, proxy: &Proxy) -> Vec<Rbac> {
    rules(snapshot, proxy, false)
        .into_iter()
        .map(|rules| Rbac {
            rules: Some(rules),
            ..Default::default()
        })
        .collect()
}

/// The RBAC network filters for the workload's TCP ports, in the order
/// they run; empty when no policy applies.
pub fn network_filters(snapshot: &Snapshot, proxy: &Proxy) -> Vec<NetworkRbac> {
    rules(snapshot, proxy, true)
        .into_iter()
        .map(|rules| NetworkRbac {
            rules: Some(rules),
            stat_prefix: "tcp.".into(),
            ..Default::default()
        })
        .collect()
}

/// The rules of each action that has policies, in the order they run;
/// for TCP when `tcp`.
fn rules(snapshot: &Snapshot, proxy: &Proxy, tcp: bool) -> Vec<RbacRules> {
    let applies = |p: &&Config<AuthorizationPolicySpec>| {
        (p.namespace == snapshot.mesh.root_namespace || p.namespace == proxy.namespace)
            && p.spec
                .selector
                .as_ref()
                .is_none_or(|s| selects(&s.match_labels, &proxy.labels))
            && p.spec.provider.is_none()
    };
    let mut policies: Vec<&Config<AuthorizationPolicySpec>> = snapshot
        .authorization_policies
        .iter()
        .filter(applies)
        .collect();
    policies.sort_by_key(|p| (p.namespace.clone(), p.name.clone()));
    let mut filters = Vec::new();
    for (action, envoy) in [
        (Action::Audit, rbac::Action::Log),
        (Action::Deny, rbac::Action::Deny),
        (Action::Allow, rbac::Action::Allow),
    ] {
        let of_action: Vec<&&Config<AuthorizationPolicySpec>> = policies
            .iter()
            .filter(|p| p.spec.action.unwrap_or(Action::Allow) == action)
            .collect();
        if of_action.is_empty() {
            continue;
        }
        let mut rules = HashMap::new();
        for policy in of_action {
            for (i, rule) in policy.spec.rules.iter().enumerate() {
                let rule = if tcp {
                    match for_tcp(rule, action) {
                        Some(rule) => std::borrow::Cow::Owned(rule),
                        None => continue,
                    }
                } else {
                    std::borrow::Cow::Borrowed(rule)
                };
                rules.insert(
                    format!("ns[{}]-policy[{}]-rule[{i}]", policy.namespace, policy.name),
                    translate_rule(&rule),
                );
            }
        }
        filters.push(RbacRules {
            action: envoy as i32,
            policies: rules,
            ..Default::default()
        });
    }
    filters
}

/// A rule as it applies to TCP: without the fields only HTTP has, or none
/// at all (an ALLOW rule that needs them allows nothing on TCP).
fn for_tcp(rule: &Rule, action: Action) -> Option<Rule> {
    let mut tcp = rule.clone();
    for to in &mut tcp.to {
        let o = &mut to.operation;
        for field in [
            &mut o.hosts,
            &mut o.not_hosts,
            &mut o.methods,
            &mut o.not_methods,
            &mut o.paths,
            &mut o.not_paths,
        ] {
            field.clear();
        }
    }
    for from in &mut tcp.from {
        from.source.request_principals.clear();
        from.source.not_request_principals.clear();
    }
    tcp.when.retain(|c| !c.key.starts_with("request."));
    if tcp == *rule {
        Some(tcp)
    } else if action == Action::Allow {
        None
    } else {
        Some(tcp)
    }
}

fn translate_rule(rule: &Rule) -> Policy {
    let mut principals: Vec<Principal> = Vec::new();
    let mut permissions: Vec<Permission> = Vec::new();
    if !rule.from.is_empty() {
        principals.push(or_ids(
            rule.from.iter().map(|f| source(&f.source)).collect(),
        ));
    }
    if !rule.to.is_empty() {
        permissions.push(or_rules(
            rule.to.iter().map(|t| operation(&t.operation)).collect(),
        ));
    }
    for condition in &rule.when {
        match condition_target(condition) {
            Target::Principal(p) => principals.push(p),
            Target::Permission(p) => permissions.push(p),
        }
    }
    Policy {
        permissions: vec![and_rules(permissions)],
        principals: vec![and_ids(principals)],
        ..Default::default()
    }
}

/// A source: every field set must match.
fn source(source: &Source) -> Principal {
    let mut ids = Vec::new();
    let mut field = |values: &[String], negated: bool, one: &dyn Fn(&str) -> Principal| {
        if values.is_empty() {
            return;
        }
        let any = or_ids(values.iter().map(|v| one(v)).collect());
        ids.push(if negated { not_id(any) } else { any });
    };
    let principal_of = |v: &str| authenticated(principal_matcher(v));
    let namespace_of = |v: &str| namespace(v);
    let direct = |v: &str| Principal {
        identifier: Some(principal::Identifier::DirectRemoteIp(cidr(v))),
    };
    let remote = |v: &str| Principal {
        identifier: Some(principal::Identifier::RemoteIp(cidr(v))),
    };
    field(&source.principals, false, &principal_of);
    field(&source.not_principals, true, &principal_of);
    field(&source.namespaces, false, &namespace_of);
    field(&source.not_namespaces, true, &namespace_of);
    field(&source.ip_blocks, false, &direct);
    field(&source.not_ip_blocks, true, &direct);
    field(&source.remote_ip_blocks, false, &remote);
    field(&source.not_remote_ip_blocks, true, &remote);
    // Request principals come from JWTs, which nothing here validates: a
    // source that asks for one matches no request.
    if !source.request_principals.is_empty() {
        ids.push(not_id(any_principal()));
    }
    and_ids(ids)
}

/// An operation: every field set must match.
fn operation(operation: &Operation) -> Permission {
    let mut rules = Vec::new();
    let mut field = |values: &[String], negated: bool, one: &dyn Fn(&str) -> Permission| {
        if values.is_empty() {
            return;
        }
        let any = or_rules(values.iter().map(|v| one(v)).collect());
        rules.push(if negated { not_rule(any) } else { any });
    };
    let host = |v: &str| Permission {
        rule: Some(permission::Rule::Header(header(":authority", v, true))),
    };
    let method = |v: &str| Permission {
        rule: Some(permission::Rule::Header(header(":method", v, false))),
    };
    let path = |v: &str| Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(wildcard(v, false))),
        })),
    };
    let port = |v: &str| Permission {
        rule: Some(permission::Rule::DestinationPort(v.parse().unwrap_or(0))),
    };
    field(&operation.hosts, false, &host);
    field(&operation.not_hosts, true, &host);
    field(&operation.methods, false, &method);
    field(&operation.not_methods, true, &method);
    field(&operation.paths, false, &path);
    field(&operation.not_paths, true, &path);
    field(&operation.ports, false, &port);
    field(&operation.not_ports, true, &port);
    and_rules(rules)
}

enum Target {
    Principal(Principal),
    Permission(Permission),
}

/// A `when` condition: request headers and source attributes are about
/// the caller, destination attributes about the request.
fn condition_target(condition: &Condition) -> Target {
    let key = condition.key.as_str();
    let principal = |one: &dyn Fn(&str) -> Principal| {
        let mut ids = Vec::new();
        if !condition.values.is_empty() {
            ids.push(or_ids(condition.values.iter().map(|v| one(v)).collect()));
        }
        if !condition.not_values.is_empty() {
            ids.push(not_id(or_ids(
                condition.not_values.iter().map(|v| one(v)).collect(),
            )));
        }
        Target::Principal(and_ids(ids))
    };
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        let name = name.to_ascii_lowercase();
        return principal(&|v| Principal {
            identifier: Some(principal::Identifier::Header(header(&name, v, false))),
        });
    }
    match key {
        "source.ip" => principal(&|v| Principal {
            identifier: Some(principal::Identifier::DirectRemoteIp(cidr(v))),
        }),
        "remote.ip" => principal(&|v| Principal {
            identifier: Some(principal::Identifier::RemoteIp(cidr(v))),
        }),
        "source.namespace" => principal(&namespace),
        "source.principal" => principal(&|v| authenticated(principal_matcher(v))),
        "destination.port" => {
            let port = |v: &str| Permission {
                rule: Some(permission::Rule::DestinationPort(v.parse().unwrap_or(0))),
            };
            let mut rules = Vec::new();
            if !condition.values.is_empty() {
                rules.push(or_rules(condition.values.iter().map(|v| port(v)).collect()));
            }
            if !condition.not_values.is_empty() {
                rules.push(not_rule(or_rules(
                    condition.not_values.iter().map(|v| port(v)).collect(),
                )));
            }
            Target::Permission(and_rules(rules))
        }
        // JWT claims and other attributes nothing here provides: the
        // condition matches no request.
        _ => Target::Principal(not_id(any_principal())),
    }
}

/// Istio writes principals without the scheme (`cluster.local/ns/x/sa/y`);
/// `*` wildcards match prefixes and suffixes.
fn principal_matcher(value: &str) -> StringMatcher {
    if value == "*" {
        return StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: ".+".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
    }
    let spiffe = |v: &str| format!("spiffe://{v}");
    if let Some(suffix) = value.strip_prefix('*') {
        StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Suffix(suffix.to_string())),
            ..Default::default()
        }
    } else if let Some(prefix) = value.strip_suffix('*') {
        StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Prefix(spiffe(prefix))),
            ..Default::default()
        }
    } else {
        StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(spiffe(value))),
            ..Default::default()
        }
    }
}

fn namespace(value: &str) -> Principal {
    authenticated(StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: format!(".*/ns/{}/.*", regex::escape(value)),
            ..Default::default()
        })),
        ..Default::default()
    })
}

fn authenticated(matcher: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(matcher),
            },
        )),
    }
}

/// Exact, or prefix/suffix with `*`; hosts ignore case.
fn wildcard(value: &str, ignore_case: bool) -> StringMatcher {
    let pattern = if value == "*" {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: ".*".into(),
            ..Default::default()
        })
    } else if let Some(suffix) = value.strip_prefix('*') {
        string_matcher::MatchPattern::Suffix(suffix.to_string())
    } else if let Some(prefix) = value.strip_suffix('*') {
        string_matcher::MatchPattern::Prefix(prefix.to_string())
    } else {
        string_matcher::MatchPattern::Exact(value.to_string())
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn header(name: &str, value: &str, ignore_case: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(wildcard(
            value,
            ignore_case,
        ))),
        ..Default::default()
    }
}

fn cidr(value: &str) -> CidrRange {
    let (address, len) = match value.split_once('/') {
        Some((a, l)) => (a.to_string(), l.parse().ok()),
        None => (value.to_string(), None),
    };
    let full = if address.contains(':') { 128 } else { 32 };
    CidrRange {
        address_prefix: address,
        prefix_len: Some(UInt32Value {
            value: len.unwrap_or(full),
        }),
    }
}

fn any_principal() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => any_principal(),
        1 => ids.into_iter().next().expect("one"),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
        },
    }
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    match ids.len() {
        1 => ids.into_iter().next().expect("one"),
        _ => Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
        },
    }
}

fn any_permission() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn and_rules(rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => any_permission(),
        1 => rules.into_iter().next().expect("one"),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules })),
        },
    }
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    match rules.len() {
        1 => rules.into_iter().next().expect("one"),
        _ => Permission {
            rule: Some(permission::Rule::OrRules(permission::Set { rules })),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: serde_json::Value) -> Rule {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_tcp_port_ignores_allow_rules_that_need_http_and_narrows_deny_rules_to_the_rest() {
        let by_principal = rule(
            serde_json::json!({"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/billing"]}}]}),
        );
        assert_eq!(
            for_tcp(&by_principal, Action::Allow),
            Some(by_principal.clone())
        );
        let with_method = rule(serde_json::json!({
            "from": [{"source": {"namespaces": ["shop"]}}],
            "to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}],
            "when": [{"key": "request.headers[x-user]", "values": ["a"]},
                     {"key": "source.ip", "values": ["10.0.0.0/8"]}],
        }));
        assert_eq!(for_tcp(&with_method, Action::Allow), None);
        let denied = for_tcp(&with_method, Action::Deny).unwrap();
        assert!(denied.to[0].operation.methods.is_empty());
        assert_eq!(denied.to[0].operation.ports, ["9000"]);
        assert_eq!(denied.from, with_method.from);
        assert_eq!(denied.when.len(), 1);
        assert_eq!(denied.when[0].key, "source.ip");
    }
}
