//! Consistent hashing, as Envoy does it: a route's `hash_policy` makes a
//! hash of each request (from a header, a cookie, the client's address or
//! a query parameter), and a RING_HASH or MAGLEV cluster maps the hash to
//! an endpoint, so that one key keeps its endpoint, and when endpoints
//! come or go only the keys of those move.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::route_action::{self, hash_policy};
use http::{HeaderMap, HeaderName, HeaderValue};
use xxhash_rust::xxh64::xxh64;

/// One of a route's hash policies.
#[derive(Debug, Clone, PartialEq)]
pub struct HashPolicy {
    key: Key,
    /// A hash from this policy ends the evaluation.
    terminal: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Key {
    Header(HeaderName),
    Cookie(Cookie),
    SourceIp,
    QueryParameter(String),
}

/// A cookie whose value is hashed; with a TTL, one is made up for a
/// request without it and set on the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Cookie {
    name: String,
    path: String,
    /// None: never made up. Zero: a session cookie.
    ttl: Option<Duration>,
    /// The attributes a made-up cookie carries after its path, written
    /// out: `; SameSite=None; Secure`.
    attributes: String,
}

/// A request's hash, and the cookie to set on its answer when a policy
/// made one up.
#[derive(Debug, Default, PartialEq)]
pub struct Hashed {
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

impl HashPolicy {
    /// Envoy's policy; `Err` names the field that is not supported.
    pub fn from_envoy(policy: &route_action::HashPolicy) -> Result<Self, (String, String)> {
        let key = match &policy.policy_specifier {
            Some(hash_policy::PolicySpecifier::Header(h)) => Key::Header(
                HeaderName::from_bytes(h.header_name.as_bytes())
                    .map_err(|e| ("header.header_name".to_string(), e.to_string()))?,
            ),
            Some(hash_policy::PolicySpecifier::Cookie(c)) => {
                if c.name.is_empty() {
                    return Err(("cookie.name".into(), "a cookie needs a name".into()));
                }
                Key::Cookie(Cookie {
                    name: c.name.clone(),
                    path: c.path.clone(),
                    ttl: c.ttl.as_ref().map(super::duration),
                    attributes: cookie_attributes(&c.attributes)?,
                })
            }
            Some(hash_policy::PolicySpecifier::ConnectionProperties(p)) if p.source_ip => {
                Key::SourceIp
            }
            Some(hash_policy::PolicySpecifier::QueryParameter(q)) => {
                Key::QueryParameter(q.name.clone())
            }
            _ => {
                return Err((
                    "policy_specifier".into(),
                    "only header, cookie, connection_properties.source_ip and query_parameter \
                     hash policies are supported"
                        .into(),
                ));
            }
        };
        Ok(Self {
            key,
            terminal: policy.terminal,
        })
    }
}

/// The hash `policies` make of a request (its headers, its query, the
/// connection's two ends), as Envoy combines them: each hash found is
/// folded into the ones before (rotated left one bit, XORed), and a
/// terminal policy that found one ends the evaluation.
pub fn request_hash(
    policies: &[HashPolicy],
    headers: &HeaderMap,
    query: Option<&str>,
    (peer, local): (SocketAddr, SocketAddr),
) -> Hashed {
    let mut hashed = Hashed::default();
    for policy in policies {
        let found = match &policy.key {
            Key::Header(name) => headers.get(name).map(|v| xxh64(v.as_bytes(), 0)),
            Key::SourceIp => Some(source_ip(peer.ip())),
            Key::QueryParameter(name) => query
                .and_then(|q| {
                    form_urlencoded::parse(q.as_bytes()).find(|(key, _)| key == name.as_str())
                })
                .map(|(_, value)| xxh64(value.as_bytes(), 0)),
            Key::Cookie(cookie) => match cookie_value(headers, &cookie.name) {
                Some(value) => Some(xxh64(value.as_bytes(), 0)),
                None => cookie.ttl.map(|ttl| {
                    // Made up once per connection, so that requests racing
                    // on one connection get the same.
                    let value = format!("{:016x}", xxh64(format!("{peer}{local}").as_bytes(), 0));
                    hashed.set_cookie =
                        HeaderValue::from_str(&set_cookie(cookie, &value, ttl)).ok();
                    xxh64(value.as_bytes(), 0)
                }),
            },
        };
        if let Some(found) = found {
            hashed.hash = Some(match hashed.hash {
                Some(before) => before.rotate_left(1) ^ found,
                None => found,
            });
            if policy.terminal {
                break;
            }
        }
    }
    hashed
}

/// The hash of a client's address (Envoy's source IP policy, for HTTP
/// routes and TCP proxies alike).
pub fn source_ip(ip: std::net::IpAddr) -> u64 {
    xxh64(ip.to_string().as_bytes(), 0)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// The `Set-Cookie` for a made-up cookie: quoted, `Max-Age` unless it is
/// a session cookie, its path, its attributes, HttpOnly.
fn set_cookie(cookie: &Cookie, value: &str, ttl: Duration) -> String {
    let mut header = format!("{}=\"{value}\"", cookie.name);
    if !ttl.is_zero() {
        header += &format!("; Max-Age={}", ttl.as_secs());
    }
    if !cookie.path.is_empty() {
        header += &format!("; Path={}", cookie.path);
    }
    header + &cookie.attributes + "; HttpOnly"
}

/// A cookie's attributes written out (`; name` or `; name=value` each),
/// or the one that could not be: an empty name, or `;` or a character a
/// header cannot carry in either part.
fn cookie_attributes(
    attributes: &[hash_policy::CookieAttribute],
) -> Result<String, (String, String)> {
    let mut written = String::new();
    for (i, attribute) in attributes.iter().enumerate() {
        let allowed = |text: &str| !text.contains(';') && HeaderValue::from_str(text).is_ok();
        if attribute.name.is_empty() || attribute.name.contains('=') || !allowed(&attribute.name) {
            return Err((
                format!("cookie.attributes[{i}].name"),
                format!("{:?} is not a cookie attribute's name", attribute.name),
            ));
        }
        if !allowed(&attribute.value) {
            return Err((
                format!("cookie.attributes[{i}].value"),
                format!(
                    "{:?} may not hold ';' or control characters",
                    attribute.value
                ),
            ));
        }
        written += "; ";
        written += &attribute.name;
        if !attribute.value.is_empty() {
            written += "=";
            written += &attribute.value;
        }
    }
    Ok(written)
}

/// Envoy's smallest ring: 1,024 entries (Istio's `minimumRingSize`).
pub const MINIMUM_RING_SIZE: u64 = 1024;
/// Envoy's largest ring: 8M entries.
pub const MAXIMUM_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's MAGLEV table size, a prime.
pub const MAGLEV_TABLE_SIZE: u64 = 65537;

/// Whether `n` is prime: a MAGLEV table's size must be.
pub fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// A ring of endpoint hashes (RING_HASH): each endpoint has entries in
/// proportion to its weight, at the hashes of its address and a counter;
/// a request goes to the first entry at or after its hash.
#[derive(Debug)]
pub struct Ring {
    /// Sorted by hash; the index is into the endpoints the ring was made of.
    entries: Vec<(u64, usize)>,
}

impl Ring {
    /// The ring of `endpoints` (address, weight), at least `minimum`
    /// entries and at most `maximum`.
    pub fn new(endpoints: &[(String, u32)], minimum: u64, maximum: u64) -> Self {
        let total: u64 = endpoints.iter().map(|(_, w)| u64::from(*w)).sum();
        let Some(lightest) = endpoints.iter().map(|(_, w)| *w).filter(|w| *w > 0).min() else {
            return Self {
                entries: Vec::new(),
            };
        };
        // As Envoy: enough entries that the lightest endpoint gets its
        // share of the minimum, but no more than the maximum.
        let lightest = lightest as f64 / total as f64;
        let scale = ((lightest * minimum as f64).ceil() / lightest).min(maximum as f64);
        let mut entries = Vec::new();
        let mut target = 0.0;
        for (index, (address, weight)) in endpoints.iter().enumerate() {
            target += scale * (*weight as f64 / total as f64);
            let mut key = format!("{address}_");
            let prefix = key.len();
            let mut n = 0u64;
            while (entries.len() as f64) < target.round() {
                key.truncate(prefix);
                key += &n.to_string();
                entries.push((xxh64(key.as_bytes(), 0), index));
                n += 1;
            }
        }
        entries.sort_unstable();
        Self { entries }
    }

    /// The endpoints in the order a request of `hash` tries them: the
    /// first entry at or after it, then on round the ring.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.entries.partition_point(|(h, _)| *h < hash);
        let (before, after) = self.entries.split_at(start);
        after.iter().chain(before).map(|(_, index)| *index)
    }
}

/// A MAGLEV lookup table: every slot names an endpoint, each endpoint
/// holding slots in proportion to its weight, filled from per-endpoint
/// permutations so that a change of endpoints moves few slots.
#[derive(Debug)]
pub struct Maglev {
    table: Vec<usize>,
}

impl Maglev {
    /// The table of `endpoints` (address, weight), `size` slots (a prime).
    pub fn new(endpoints: &[(String, u32)], size: u64) -> Self {
        let size = size as usize;
        let live: Vec<(usize, u64, u64, u32)> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, (_, w))| *w > 0)
            .map(|(index, (address, weight))| {
                let offset = xxh64(address.as_bytes(), 0) % size as u64;
                let skip = xxh64(address.as_bytes(), 1) % (size as u64 - 1) + 1;
                (index, offset, skip, *weight)
            })
            .collect();
        if live.is_empty() || size == 0 {
            return Self { table: Vec::new() };
        }
        let heaviest = live.iter().map(|l| l.3).max().unwrap_or(1) as f64;
        let mut table = vec![usize::MAX; size];
        let mut next = vec![0u64; live.len()];
        let mut credit = vec![0.0f64; live.len()];
        let mut filled = 0;
        'fill: loop {
            for (i, &(index, offset, skip, weight)) in live.iter().enumerate() {
                // Weighted as Envoy's: a lighter endpoint takes its turn
                // only once it has gathered a whole credit.
                credit[i] += weight as f64 / heaviest;
                if credit[i] < 1.0 {
                    continue;
                }
                credit[i] -= 1.0;
                loop {
                    let slot = ((offset + next[i] * skip) % size as u64) as usize;
                    next[i] += 1;
                    if table[slot] == usize::MAX {
                        table[slot] = index;
                        filled += 1;
                        break;
                    }
                }
                if filled == size {
                    break 'fill;
                }
            }
        }
        Self { table }
    }

    /// The endpoints in the order a request of `hash` tries them: its
    /// slot's, then the next slots'.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = if self.table.is_empty() {
            0
        } else {
            (hash % self.table.len() as u64) as usize
        };
        let (before, after) = self.table.split_at(start);
        after.iter().chain(before).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::from_json;
    use crate::testing::headers;
    use serde_json::json;

    fn policies(value: serde_json::Value) -> Vec<HashPolicy> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|p| HashPolicy::from_envoy(&from_json(p.clone()).unwrap()).unwrap())
            .collect()
    }

    fn ends(peer: &str) -> (SocketAddr, SocketAddr) {
        (peer.parse().unwrap(), "10.0.0.9:8080".parse().unwrap())
    }

    #[test]
    fn a_request_hashes_by_its_header_cookie_address_or_query() {
        let by_user = policies(json!([{"header": {"header_name": "x-user"}}]));
        let hash = |p: &[HashPolicy], h: &[(&str, &str)], q: Option<&str>, peer: &str| {
            request_hash(p, &headers(h), q, ends(peer)).hash
        };
        let alice = hash(&by_user, &[("x-user", "alice")], None, "10.0.0.1:1000");
        assert!(alice.is_some());
        assert_eq!(
            alice,
            hash(&by_user, &[("x-user", "alice")], None, "10.0.0.2:2000")
        );
        assert_ne!(
            alice,
            hash(&by_user, &[("x-user", "bob")], None, "10.0.0.1:1000")
        );
        assert_eq!(
            hash(&by_user, &[], None, "10.0.0.1:1000"),
            None,
            "no header, no hash"
        );

        let by_ip = policies(json!([{"connection_properties": {"source_ip": true}}]));
        assert_eq!(
            hash(&by_ip, &[], None, "10.0.0.1:1000"),
            hash(&by_ip, &[], None, "10.0.0.1:2000"),
            "the port does not count"
        );
        let by_query = policies(json!([{"query_parameter": {"name": "user"}}]));
        assert_eq!(
            hash(&by_query, &[], Some("a=1&user=alice"), "10.0.0.1:1"),
            hash(&by_query, &[], Some("user=alice"), "10.0.0.2:1"),
        );
        let by_cookie = policies(json!([{"cookie": {"name": "session"}}]));
        assert_eq!(
            hash(
                &by_cookie,
                &[("cookie", "a=b; session=\"s1\"")],
                None,
                "10.0.0.1:1"
            ),
            hash(&by_cookie, &[("cookie", "session=s1")], None, "10.0.0.2:1"),
        );
        assert_eq!(
            hash(&by_cookie, &[], None, "10.0.0.1:1"),
            None,
            "no TTL: none made up"
        );

        // Envoy's folding, and a terminal policy that found its key.
        let both = policies(json!([
            {"header": {"header_name": "x-user"}, "terminal": true},
            {"connection_properties": {"source_ip": true}},
        ]));
        assert_eq!(
            hash(&both, &[("x-user", "alice")], None, "10.0.0.1:1"),
            alice
        );
        let ip = hash(&by_ip, &[], None, "10.0.0.1:1");
        assert_eq!(hash(&both, &[], None, "10.0.0.1:1"), ip);
    }

    #[test]
    fn a_cookie_with_a_ttl_is_made_up_once_per_connection_and_set() {
        let by_cookie =
            policies(json!([{"cookie": {"name": "session", "ttl": "3600s", "path": "/"}}]));
        let first = request_hash(&by_cookie, &HeaderMap::new(), None, ends("10.0.0.1:1000"));
        let again = request_hash(&by_cookie, &HeaderMap::new(), None, ends("10.0.0.1:1000"));
        assert_eq!(first.hash, again.hash);
        let set = first.set_cookie.unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.starts_with("session=\"") && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
            "{set}"
        );
        // The client sends it back: the same hash.
        let value = set.split(';').next().unwrap();
        let back = request_hash(
            &by_cookie,
            &headers(&[("cookie", value)]),
            None,
            ends("10.0.0.7:9"),
        );
        assert_eq!(back.hash, first.hash);
        assert_eq!(back.set_cookie, None);

        let with_attributes = policies(json!([{"cookie": {"name": "session", "ttl": "0s",
            "attributes": [{"name": "SameSite", "value": "None"}, {"name": "Secure"}]}}]));
        let made = request_hash(
            &with_attributes,
            &HeaderMap::new(),
            None,
            ends("10.0.0.1:1"),
        );
        let set = made.set_cookie.unwrap();
        assert!(
            set.to_str()
                .unwrap()
                .ends_with("\"; SameSite=None; Secure; HttpOnly"),
            "{set:?}"
        );
    }

    #[test]
    fn a_cookie_attribute_that_would_break_the_header_is_refused() {
        let refused = |attribute: serde_json::Value| {
            let policy =
                from_json(json!({"cookie": {"name": "s", "ttl": "0s", "attributes": [attribute]}}))
                    .unwrap();
            HashPolicy::from_envoy(&policy).unwrap_err().0
        };
        assert_eq!(refused(json!({"name": ""})), "cookie.attributes[0].name");
        assert_eq!(
            refused(json!({"name": "Secure; Domain"})),
            "cookie.attributes[0].name"
        );
        assert_eq!(
            refused(json!({"name": "Domain", "value": "a\nb"})),
            "cookie.attributes[0].value"
        );
    }

    fn addresses(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("10.0.0.{i}:8080"), 1)).collect()
    }

    /// Where keys 0..count land.
    fn placed(walk: impl Fn(u64) -> usize, count: u64) -> Vec<usize> {
        (0..count)
            .map(|k| walk(xxh64(&k.to_le_bytes(), 7)))
            .collect()
    }

    /// How many of the `placed` keys landed on each of `endpoints`.
    fn shares(placed: &[usize], endpoints: usize) -> Vec<usize> {
        (0..endpoints)
            .map(|e| placed.iter().filter(|p| **p == e).count())
            .collect()
    }

    #[test]
    fn a_ring_spreads_keys_by_weight_and_moves_few_when_an_endpoint_goes() {
        let ring = Ring::new(&addresses(4), MINIMUM_RING_SIZE, MAXIMUM_RING_SIZE);
        assert!(ring.entries.len() >= 1024);
        let before = placed(|h| ring.walk(h).next().unwrap(), 10_000);
        let spread = shares(&before, 4);
        assert!(
            spread.iter().all(|s| (1_500..3_500).contains(s)),
            "of 10,000: {spread:?}"
        );
        // Endpoint 3 out (ejected: the walk passes it): only its keys move.
        let skipping = placed(|h| ring.walk(h).find(|e| *e != 3).unwrap(), 10_000);
        let moved = before.iter().zip(&skipping).filter(|(b, a)| b != a).count();
        let had = spread[3];
        assert_eq!(moved, had, "only endpoint 3's keys moved");
        // Endpoint 3 gone from EDS: the others' entries grow to keep the
        // ring's size, so a few of theirs move too, as in Envoy.
        let three = Ring::new(&addresses(3), MINIMUM_RING_SIZE, MAXIMUM_RING_SIZE);
        let after = placed(|h| three.walk(h).next().unwrap(), 10_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(
            moved < had + 1_500,
            "{moved} of 10,000 moved, {had} were endpoint 3's"
        );

        // Weights: 3 to 1.
        let mut weighted = addresses(2);
        weighted[0].1 = 3;
        let ring = Ring::new(&weighted, MINIMUM_RING_SIZE, MAXIMUM_RING_SIZE);
        let heavy = shares(&placed(|h| ring.walk(h).next().unwrap(), 10_000), 2)[0];
        assert!(
            (6_500..8_500).contains(&heavy),
            "{heavy} of 10,000 for weight 3 of 4"
        );
    }

    #[test]
    fn a_maglev_table_spreads_keys_evenly_and_moves_few_when_an_endpoint_goes() {
        let table = Maglev::new(&addresses(4), MAGLEV_TABLE_SIZE);
        assert_eq!(table.table.len(), 65537);
        let before = placed(|h| table.walk(h).next().unwrap(), 10_000);
        let spread = shares(&before, 4);
        assert!(
            spread.iter().all(|s| (2_000..3_000).contains(s)),
            "of 10,000: {spread:?}"
        );
        let three = Maglev::new(&addresses(3), MAGLEV_TABLE_SIZE);
        let after = placed(|h| three.walk(h).next().unwrap(), 10_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(
            moved < 4_000,
            "{moved} of 10,000 keys moved for a quarter of the endpoints"
        );
    }
}
