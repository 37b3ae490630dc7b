// Command etcd: the etcd server, built from its Go module for meshbridge's kube tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
