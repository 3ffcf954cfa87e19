// kstatus reads Kubernetes objects (JSON, one per line) on stdin and prints,
// for each, the health the kstatus library computes from it — the library
// Flux and Argo CD-style tools use to decide whether what they applied is
// Current, InProgress or Failed — followed by its message.
package main

import (
	"bufio"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	for scanner.Scan() {
		object := &unstructured.Unstructured{}
		if err := object.UnmarshalJSON(scanner.Bytes()); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: not a Kubernetes object: %v\n", err)
			os.Exit(2)
		}
		result, err := status.Compute(object)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
			os.Exit(2)
		}
		fmt.Printf("%s\t%s\n", result.Status, result.Message)
	}
	if err := scanner.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(2)
	}
}
