// Command kstatus prints the kstatus of Kubernetes objects, as sigs.k8s.io/cli-utils computes it (the
// library Flux, kpt and `kubectl apply --wait`-style tools use to tell whether a resource is ready).
//
// It reads one object, or a List of them (`kubectl get -o json`), as JSON on stdin and writes one JSON
// line per object: {"name": ..., "status": "Current|InProgress|Failed|Terminating|Unknown", "message": ...}.
// The VisionFT tests use it to check that every phase and every stuck state of a VisionFineTune reads
// as it should.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	// (This decoder keeps whole numbers int64, as unstructured objects need them.)
	var doc map[string]interface{}
	if err := utiljson.Unmarshal(raw, &doc); err != nil {
		fail(err)
	}
	objects := []map[string]interface{}{doc}
	if items, ok := doc["items"].([]interface{}); ok {
		objects = objects[:0]
		for _, item := range items {
			obj, ok := item.(map[string]interface{})
			if !ok {
				fail(fmt.Errorf("a List item is not an object: %v", item))
			}
			objects = append(objects, obj)
		}
	}
	out := json.NewEncoder(os.Stdout)
	for _, obj := range objects {
		u := &unstructured.Unstructured{Object: obj}
		result, err := status.Compute(u)
		if err != nil {
			fail(fmt.Errorf("%s: %w", u.GetName(), err))
		}
		if err := out.Encode(verdict{u.GetName(), result.Status.String(), result.Message}); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
