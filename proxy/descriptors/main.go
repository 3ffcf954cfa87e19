// Writes the protobuf descriptors of the Envoy API subset Bowline's proxy
// reads (a FileDescriptorSet, binary, to stdout): the xDS resource types,
// the Bootstrap a static configuration file is written as, and every
// extension the control plane puts in a typed_config. The proxy decodes
// JSON and YAML configuration with them, exactly as Envoy would read it.
//
// usage: envoy-descriptors > ../src/envoy.binpb
package main

import (
	"fmt"
	"os"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	trace "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	fileaccesslog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	fault "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	httpinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	tls "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

func main() {
	roots := []proto.Message{
		&bootstrap.Bootstrap{},
		&listener.Listener{},
		&route.RouteConfiguration{},
		&cluster.Cluster{},
		&endpoint.ClusterLoadAssignment{},
		&tls.Secret{},
		&tls.UpstreamTlsContext{},
		&tls.DownstreamTlsContext{},
		&hcm.HttpConnectionManager{},
		&tcpproxy.TcpProxy{},
		&netrbac.RBAC{},
		&router.Router{},
		&fault.HTTPFault{},
		&httprbac.RBAC{},
		&httprbac.RBACPerRoute{},
		&originaldst.OriginalDst{},
		&tlsinspector.TlsInspector{},
		&httpinspector.HttpInspector{},
		&upstreamhttp.HttpProtocolOptions{},
		&fileaccesslog.FileAccessLog{},
		&trace.OpenTelemetryConfig{},
		&previoushosts.PreviousHostsPredicate{},
	}
	set := &descriptorpb.FileDescriptorSet{}
	seen := map[string]bool{}
	var add func(file protoreflect.FileDescriptor)
	// Dependencies first, each file once, in a stable order.
	add = func(file protoreflect.FileDescriptor) {
		if seen[file.Path()] {
			return
		}
		seen[file.Path()] = true
		imports := file.Imports()
		for i := 0; i < imports.Len(); i++ {
			add(imports.Get(i).FileDescriptor)
		}
		set.File = append(set.File, protodesc.ToFileDescriptorProto(file))
	}
	for _, root := range roots {
		add(root.ProtoReflect().Descriptor().ParentFile())
	}
	out, err := proto.MarshalOptions{Deterministic: true}.Marshal(set)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
