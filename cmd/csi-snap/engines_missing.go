//go:build !engines

package main

import "errors"

// Until the cow and driver/kernel packages are on this branch, the binary is
// built without them and refuses to start with the real engines; build with
// -tags engines once they land. Tests use in-memory engines.
var errNoEngines = errors.New("built without the cow and kernel engines (build tag engines)")

func openRealEngines(Config) (*engines, error) { return nil, errNoEngines }

func runHolder(string) error { return errNoEngines }
