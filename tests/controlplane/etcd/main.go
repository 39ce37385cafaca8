// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 at the version go.mod
// pins. The upstream binary's main package lives in the go.etcd.io/etcd/v3 root module, which
// would drag in etcdctl and etcdutl too; its whole body is this one call.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
