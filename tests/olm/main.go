// Validates an OLM bundle directory (manifests/ and metadata/) with the
// operator framework's own validators: the defaults every bundle must pass
// and the optional operatorframework suite (OperatorHub metadata, standard
// categories and capabilities, bundle objects, good practices, deprecated
// APIs for the given Kubernetes version). Prints one line per finding as
// "<level>\t<object>\t<detail>" and exits 1 on any error.
//
// usage: olm-validate <bundle dir> <kubernetes version>
package main

import (
	"fmt"
	"os"

	"github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
	"github.com/operator-framework/api/pkg/validation/errors"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: olm-validate <bundle dir> <kubernetes version>")
		os.Exit(2)
	}
	bundle, err := manifests.GetBundleFromDir(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "loading the bundle: %v\n", err)
		os.Exit(1)
	}
	validators := validation.DefaultBundleValidators.WithValidators(
		validation.OperatorHubV2Validator,
		validation.StandardCategoriesValidator,
		validation.StandardCapabilitiesValidator,
		validation.ObjectValidator,
		validation.GoodPracticesValidator,
		validation.AlphaDeprecatedAPIsValidator,
	)
	objects := append(bundle.ObjectsToValidate(), map[string]string{"k8s-version": os.Args[2]})
	failed := false
	for _, result := range validators.Validate(objects...) {
		for _, finding := range append(result.Errors, result.Warnings...) {
			fmt.Printf("%s\t%s\t%s\n", finding.Level, result.Name, finding.Error())
			if finding.Level == errors.LevelError {
				failed = true
			}
		}
	}
	if failed {
		os.Exit(1)
	}
}
