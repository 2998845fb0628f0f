// Command etcd is etcd v3.6 built from the module proxy for hack/e2e.sh; the
// version is pinned in this directory's go.mod.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
