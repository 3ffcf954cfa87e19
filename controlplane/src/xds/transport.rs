//! The ADS methods served over gRPC without tonic's response encoder.
//!
//! tonic encodes a stream's messages into one buffer per stream that keeps
//! the capacity of the largest message it ever held; with a route
//! configuration of a thousand virtual hosts that is half a megabyte per
//! connected proxy for as long as it stays connected. Here each response
//! is framed in an allocation of its own size, which goes as soon as
//! HTTP/2 has sent it. Requests are decoded by tonic as usual.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::future::BoxFuture;
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, Streaming};
use tonic::server::NamedService;

use super::{Discovery, Presented};

const STREAM: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The largest request accepted from a proxy.
const MAX_REQUEST: usize = 64 << 20;

/// Discovery as a gRPC service, for a tonic server's router.
#[derive(Clone, Debug)]
pub struct AdsService(pub Discovery);

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tower::Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let discovery = self.0.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let request = tonic::Request::from_http(request);
            let presented = Presented::of(&request);
            let identity = match discovery.auth.identify(presented).await {
                Ok(identity) => identity,
                Err(status) => return Ok(status.into_http()),
            };
            let (tx, rx) = mpsc::channel(8);
            match path.as_str() {
                DELTA => {
                    let requests = decode::<DeltaDiscoveryRequest>(request.into_inner());
                    discovery.delta(identity, requests, tx);
                }
                STREAM => {
                    let requests = decode::<DiscoveryRequest>(request.into_inner());
                    discovery.state_of_the_world(identity, requests, tx);
                }
                other => return Ok(Status::unimplemented(format!("no method {other}")).into_http()),
            }
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(Frames { rx, done: false }))
                .expect("a valid response"))
        })
    }
}

fn decode<T: Message + Default + Send + 'static>(body: Body) -> Streaming<T> {
    let mut codec = tonic_prost::ProstCodec::<T, T>::default();
    Streaming::new_request(codec.decoder(), body, None, Some(MAX_REQUEST))
}

/// A message as gRPC frames it: uncompressed, its length, its bytes.
pub fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message
        .encode(&mut buf)
        .expect("a Vec has room for the encoded length");
    Bytes::from(buf)
}

/// The response body: framed messages as the stream sends them, then the
/// gRPC status in trailers.
struct Frames {
    rx: mpsc::Receiver<Result<Bytes, Status>>,
    done: bool,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
