//! Access logs as Envoy's file access logger writes them: a line per
//! request or TCP connection, to a file or `/dev/stdout`, in a text or JSON
//! format made of Envoy's command operators (`%RESPONSE_CODE%`,
//! `%REQ(:AUTHORITY)%`, …). The control plane asks for them when the mesh
//! config sets `accessLogFile`.
//!
//! Lines are handed to a writer thread per file, which writes them in
//! batches: a slow disk or a full pipe never holds up a request.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Sender};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog as EnvoyAccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{
    SubstitutionFormatString, data_source, substitution_format_string,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use envoy_types::pb::google::protobuf::{Struct, value::Kind};
use http::{HeaderMap, HeaderName, Method, Uri, Version};

use super::metrics::Flags;
use crate::envoy::unpack;

pub const FILE_ACCESS_LOG: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";

/// Envoy's default line, when a file access log names no format.
const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// One access log: where its lines go and what they say.
#[derive(Debug)]
pub struct AccessLog {
    path: String,
    format: Format,
}

#[derive(Debug)]
enum Format {
    Text(Template),
    /// Keys in order, each a template; a template of one operator keeps
    /// its type (numbers stay numbers, absent values are null).
    Json(Vec<(String, Template)>),
}

#[derive(Debug)]
struct Template(Vec<Part>);

#[derive(Debug)]
enum Part {
    Text(String),
    Operator(Operator, Option<usize>),
}

#[derive(Debug)]
enum Operator {
    StartTime,
    /// A header, or one of the pseudo-headers `:method`, `:path`,
    /// `:authority`, `:scheme`; else the second.
    Request(String, Option<String>),
    Response(String, Option<String>),
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    RouteName,
    GrpcStatus,
    /// A command Envoy knows whose value this proxy does not track.
    Untracked,
}

/// A request's head, kept for its log line.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// What a line is made from.
#[derive(Debug)]
pub struct Entry<'a> {
    pub started: SystemTime,
    pub duration: Duration,
    /// None for a TCP connection.
    pub request: Option<&'a Head>,
    pub response: Option<&'a HeaderMap>,
    pub code: Option<u16>,
    pub flags: Flags,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<&'a str>,
    pub upstream_cluster: Option<&'a str>,
    pub downstream_local: SocketAddr,
    pub downstream_remote: SocketAddr,
    pub route_name: Option<&'a str>,
    pub grpc_status: Option<u16>,
}

/// A request's facts that only its log line needs, gathered while it is
/// served and written when its response ends.
#[derive(Debug)]
pub struct Pending {
    pub logs: std::sync::Arc<[AccessLog]>,
    pub started: SystemTime,
    pub head: Head,
    pub response: HeaderMap,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<String>,
    pub route_name: Option<String>,
    pub downstream_local: SocketAddr,
    pub downstream_remote: SocketAddr,
}

impl Pending {
    pub fn write(&self, request: &super::metrics::Completed) {
        let entry = Entry {
            started: self.started,
            duration: request.started.elapsed(),
            request: Some(&self.head),
            response: Some(&self.response),
            code: Some(request.labels.code),
            flags: request.labels.flags,
            bytes_received: request.request_bytes,
            bytes_sent: request.response_bytes,
            upstream_host: self.upstream_host.as_deref(),
            upstream_cluster: self.upstream_cluster.as_deref(),
            downstream_local: self.downstream_local,
            downstream_remote: self.downstream_remote,
            route_name: self.route_name.as_deref(),
            grpc_status: request.labels.grpc_status,
        };
        for log in self.logs.iter() {
            log.write(&entry);
        }
    }
}

enum Value<'a> {
    Text(Cow<'a, str>),
    Number(u64),
    Absent,
}

impl AccessLog {
    /// Converts an `access_log` entry; only the file logger is served.
    pub fn from_envoy(log: &EnvoyAccessLog) -> Result<Self, String> {
        if log.filter.is_some() {
            return Err("access log filters are not supported".into());
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
            return Err("a typed_config is needed".into());
        };
        let file: FileAccessLog = unpack(any).map_err(|e| format!("typed_config: {e}"))?;
        if file.path.is_empty() {
            return Err("typed_config.path: a file (or /dev/stdout) is needed".into());
        }
        #[allow(deprecated)]
        let format = match &file.access_log_format {
            None => Format::Text(Template::parse(DEFAULT_FORMAT)?),
            Some(file_access_log::AccessLogFormat::Format(text)) => {
                Format::Text(Template::parse(text)?)
            }
            Some(file_access_log::AccessLogFormat::JsonFormat(json)) => json_format(json)?,
            Some(file_access_log::AccessLogFormat::LogFormat(format)) => {
                substitution_format(format)?
            }
            Some(_) => return Err("typed_config: only text and JSON formats are supported".into()),
        };
        Ok(Self {
            path: file.path,
            format,
        })
    }

    /// Writes `entry`'s line.
    pub fn write(&self, entry: &Entry<'_>) {
        let mut line = match &self.format {
            Format::Text(template) => template.render(entry),
            Format::Json(fields) => {
                let object: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(key, template)| (key.clone(), template.json(entry)))
                    .collect();
                serde_json::Value::Object(object).to_string()
            }
        };
        if !line.ends_with('\n') {
            line.push('\n');
        }
        sink(&self.path).send(line.into_bytes());
    }
}

#[allow(deprecated)]
fn substitution_format(format: &SubstitutionFormatString) -> Result<Format, String> {
    match &format.format {
        Some(substitution_format_string::Format::TextFormat(text)) => {
            Ok(Format::Text(Template::parse(text)?))
        }
        Some(substitution_format_string::Format::TextFormatSource(source)) => {
            match &source.specifier {
                Some(data_source::Specifier::InlineString(text)) => {
                    Ok(Format::Text(Template::parse(text)?))
                }
                _ => Err("log_format.text_format_source: only inline_string is supported".into()),
            }
        }
        Some(substitution_format_string::Format::JsonFormat(json)) => json_format(json),
        None => Ok(Format::Text(Template::parse(DEFAULT_FORMAT)?)),
    }
}

fn json_format(json: &Struct) -> Result<Format, String> {
    let mut fields: Vec<(String, Template)> = json
        .fields
        .iter()
        .map(|(key, value)| match &value.kind {
            Some(Kind::StringValue(text)) => Template::parse(text)
                .map(|t| (key.clone(), t))
                .map_err(|e| format!("json_format.{key}: {e}")),
            _ => Err(format!("json_format.{key}: only strings are supported")),
        })
        .collect::<Result<_, _>>()?;
    // Protobuf maps have no order; sorted keys read the same every time.
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Format::Json(fields))
}

impl Template {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 1..];
            let Some(end) = after.find('%') else {
                return Err(format!("unterminated command in {text:?}"));
            };
            let command = &after[..end];
            if command.is_empty() {
                parts.push(Part::Text("%".into()));
            } else {
                let (command, length) = match command.rsplit_once(':') {
                    Some((head, length)) if head.ends_with(')') => (
                        head,
                        Some(
                            length
                                .parse()
                                .map_err(|_| format!("%{command}%: bad length"))?,
                        ),
                    ),
                    _ => (command, None),
                };
                parts.push(Part::Operator(Operator::parse(command)?, length));
            }
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Self(parts))
    }

    fn render(&self, entry: &Entry<'_>) -> String {
        let mut line = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => line.push_str(text),
                Part::Operator(operator, length) => match operator.value(entry) {
                    Value::Text(text) => line.push_str(truncate(&text, *length)),
                    Value::Number(n) => line.push_str(&n.to_string()),
                    Value::Absent => line.push('-'),
                },
            }
        }
        line
    }

    fn json(&self, entry: &Entry<'_>) -> serde_json::Value {
        match self.0.as_slice() {
            [Part::Operator(operator, length)] => match operator.value(entry) {
                Value::Text(text) => truncate(&text, *length).into(),
                Value::Number(n) => n.into(),
                Value::Absent => serde_json::Value::Null,
            },
            _ => self.render(entry).into(),
        }
    }
}

fn truncate(text: &str, length: Option<usize>) -> &str {
    match length {
        Some(n) if text.len() > n => {
            let mut end = n;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &text[..end]
        }
        _ => text,
    }
}

impl Operator {
    fn parse(command: &str) -> Result<Self, String> {
        let header = |inner: &str| -> Result<(String, Option<String>), String> {
            let name = |n: &str| {
                let n = n.trim().to_ascii_lowercase();
                let bare = n.strip_prefix(':').unwrap_or(&n);
                HeaderName::from_bytes(bare.as_bytes())
                    .map(|_| n.clone())
                    .map_err(|_| format!("%{command}%: {n:?} is not a header name"))
            };
            match inner.split_once('?') {
                Some((first, second)) => Ok((name(first)?, Some(name(second)?))),
                None => Ok((name(inner)?, None)),
            }
        };
        if let Some(inner) = command
            .strip_prefix("REQ(")
            .and_then(|c| c.strip_suffix(')'))
        {
            let (name, alternative) = header(inner)?;
            return Ok(Operator::Request(name, alternative));
        }
        if let Some(inner) = command
            .strip_prefix("RESP(")
            .and_then(|c| c.strip_suffix(')'))
        {
            let (name, alternative) = header(inner)?;
            return Ok(Operator::Response(name, alternative));
        }
        Ok(match command.split_once('(').map_or(command, |(c, _)| c) {
            "START_TIME" => Operator::StartTime,
            "PROTOCOL" => Operator::Protocol,
            "RESPONSE_CODE" => Operator::ResponseCode,
            "RESPONSE_CODE_DETAILS" => Operator::ResponseCodeDetails,
            "RESPONSE_FLAGS" => Operator::ResponseFlags,
            "BYTES_RECEIVED" => Operator::BytesReceived,
            "BYTES_SENT" => Operator::BytesSent,
            "DURATION" => Operator::Duration,
            "UPSTREAM_HOST" => Operator::UpstreamHost,
            "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Operator::UpstreamCluster,
            "DOWNSTREAM_LOCAL_ADDRESS" => Operator::DownstreamLocalAddress,
            "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_PEER_ADDRESS" => {
                Operator::DownstreamRemoteAddress
            }
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
                Operator::DownstreamRemoteAddressWithoutPort
            }
            "ROUTE_NAME" => Operator::RouteName,
            "GRPC_STATUS" | "GRPC_STATUS_NUMBER" => Operator::GrpcStatus,
            // Envoy's, with nothing behind them here yet (no TLS, no
            // termination details): written as absent.
            "CONNECTION_TERMINATION_DETAILS"
            | "UPSTREAM_TRANSPORT_FAILURE_REASON"
            | "UPSTREAM_LOCAL_ADDRESS"
            | "REQUESTED_SERVER_NAME" => Operator::Untracked,
            _ => return Err(format!("%{command}% is not a command this proxy knows")),
        })
    }

    fn value<'e>(&self, entry: &'e Entry<'_>) -> Value<'e> {
        let text = |s: &'e str| Value::Text(Cow::Borrowed(s));
        let owned = |s: String| Value::Text(Cow::Owned(s));
        let header = |headers: Option<&'e HeaderMap>, name: &str| {
            headers?.get(name).and_then(|v| v.to_str().ok())
        };
        match self {
            Operator::StartTime => {
                let time = time::OffsetDateTime::from(entry.started);
                let format = time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                );
                time.format(&format).map_or(Value::Absent, owned)
            }
            Operator::Request(name, alternative) => {
                let Some(request) = entry.request else {
                    return Value::Absent;
                };
                let find = |name: &str| match name {
                    ":method" => Some(request.method.as_str()),
                    ":path" => request.uri.path_and_query().map(|p| p.as_str()),
                    ":authority" => request
                        .uri
                        .authority()
                        .map(|a| a.as_str())
                        .or_else(|| request.headers.get(http::header::HOST)?.to_str().ok()),
                    ":scheme" => Some(request.uri.scheme_str().unwrap_or("http")),
                    _ => header(Some(&request.headers), name),
                };
                find(name)
                    .or_else(|| alternative.as_deref().and_then(find))
                    .map_or(Value::Absent, text)
            }
            Operator::Response(name, alternative) => header(entry.response, name)
                .or_else(|| header(entry.response, alternative.as_deref()?))
                .map_or(Value::Absent, text),
            Operator::Protocol => match entry.request.map(|r| r.version) {
                Some(Version::HTTP_10) => text("HTTP/1.0"),
                Some(Version::HTTP_11) => text("HTTP/1.1"),
                Some(Version::HTTP_2) => text("HTTP/2"),
                Some(_) => text("HTTP/3"),
                None => Value::Absent,
            },
            Operator::ResponseCode => Value::Number(entry.code.unwrap_or(0).into()),
            Operator::ResponseCodeDetails => match (entry.code, entry.flags == Flags::default()) {
                (Some(_), true) => text("via_upstream"),
                (Some(_), false) => owned(entry.flags.to_label().into_owned()),
                (None, _) => Value::Absent,
            },
            Operator::ResponseFlags => owned(entry.flags.to_label().into_owned()),
            Operator::Untracked => Value::Absent,
            Operator::BytesReceived => Value::Number(entry.bytes_received),
            Operator::BytesSent => Value::Number(entry.bytes_sent),
            Operator::Duration => Value::Number(entry.duration.as_millis() as u64),
            Operator::UpstreamHost => entry.upstream_host.map_or(Value::Absent, text),
            Operator::UpstreamCluster => entry.upstream_cluster.map_or(Value::Absent, text),
            Operator::DownstreamLocalAddress => owned(entry.downstream_local.to_string()),
            Operator::DownstreamRemoteAddress => owned(entry.downstream_remote.to_string()),
            Operator::DownstreamRemoteAddressWithoutPort => {
                owned(entry.downstream_remote.ip().to_string())
            }
            Operator::RouteName => entry.route_name.map_or(Value::Absent, text),
            Operator::GrpcStatus => entry
                .grpc_status
                .map_or(Value::Absent, |s| Value::Number(s.into())),
        }
    }
}

/// A file's writer thread, fed through a channel.
#[derive(Clone)]
struct Sink(Sender<Vec<u8>>);

impl Sink {
    fn send(&self, line: Vec<u8>) {
        let _ = self.0.send(line);
    }
}

/// The writer of `path`, started on first use and shared by every log
/// that names the path.
fn sink(path: &str) -> Sink {
    static SINKS: LazyLock<Mutex<HashMap<String, Sink>>> = LazyLock::new(Default::default);
    let mut sinks = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sink) = sinks.get(path) {
        return sink.clone();
    }
    let (sender, lines) = mpsc::channel::<Vec<u8>>();
    let file = path.to_string();
    let spawned = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            let out: Box<dyn Write> = match file.as_str() {
                "/dev/stdout" => Box::new(std::io::stdout()),
                "/dev/stderr" => Box::new(std::io::stderr()),
                _ => match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file)
                {
                    Ok(f) => Box::new(f),
                    Err(error) => {
                        tracing::error!(path = %file, %error, "cannot open the access log; its lines are dropped");
                        return;
                    }
                },
            };
            let mut out = std::io::BufWriter::new(out);
            while let Ok(line) = lines.recv() {
                let _ = out.write_all(&line);
                // Whatever else is queued goes in the same write.
                while let Ok(line) = lines.try_recv() {
                    let _ = out.write_all(&line);
                }
                let _ = out.flush();
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%path, %error, "cannot start the access log writer");
    }
    let sink = Sink(sender);
    sinks.insert(path.to_string(), sink.clone());
    sink
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(head: &Head) -> Entry<'_> {
        Entry {
            started: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            duration: Duration::from_millis(12),
            request: Some(head),
            response: None,
            code: Some(200),
            flags: Flags::default(),
            bytes_received: 0,
            bytes_sent: 31,
            upstream_host: Some("10.0.0.7:9080"),
            upstream_cluster: Some("outbound|9080||reviews.shop.svc.cluster.local"),
            downstream_local: "127.0.0.1:15001".parse().unwrap(),
            downstream_remote: "127.0.0.1:40000".parse().unwrap(),
            route_name: Some("default"),
            grpc_status: None,
        }
    }

    fn head() -> Head {
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "curl/8".parse().unwrap());
        headers.insert("host", "reviews:9080".parse().unwrap());
        Head {
            method: Method::GET,
            uri: "/reviews/1?x=1".parse().unwrap(),
            version: Version::HTTP_11,
            headers,
        }
    }

    #[test]
    fn envoys_default_line() {
        let head = head();
        let line = Template::parse(DEFAULT_FORMAT)
            .unwrap()
            .render(&entry(&head));
        assert_eq!(
            line,
            "[2023-11-14T22:13:20.123Z] \"GET /reviews/1?x=1 HTTP/1.1\" 200 - 0 31 12 - \"-\" \"curl/8\" \"-\" \"reviews:9080\" \"10.0.0.7:9080\"\n"
        );
    }

    #[test]
    fn json_keeps_numbers_and_nulls() {
        let head = head();
        let Format::Json(fields) = json_format(&Struct {
            fields: [
                ("code", "%RESPONSE_CODE%"),
                ("agent", "%REQ(USER-AGENT)%"),
                ("id", "%REQ(X-REQUEST-ID)%"),
                ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
                ("flags", "%RESPONSE_FLAGS%"),
            ]
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    envoy_types::pb::google::protobuf::Value {
                        kind: Some(Kind::StringValue(v.into())),
                    },
                )
            })
            .collect(),
        })
        .unwrap() else {
            panic!("JSON");
        };
        let entry = entry(&head);
        let values: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .map(|(k, t)| (k.clone(), t.json(&entry)))
            .collect();
        assert_eq!(
            serde_json::Value::Object(values),
            serde_json::json!({"code": 200, "agent": "curl/8", "id": null, "path": "/reviews/1?x=1", "flags": "-"})
        );
    }

    #[test]
    fn unknown_commands_are_named() {
        let error = Template::parse("%NOT_A_THING%").unwrap_err();
        assert!(error.contains("%NOT_A_THING%"), "{error}");
    }
}
