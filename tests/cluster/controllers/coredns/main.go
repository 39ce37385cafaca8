// A CoreDNS built with only what the test cluster's DNS needs: it answers for the cluster zone
// from the Kubernetes API and nothing else. There is deliberately no forward (or grpc, etcd, ...)
// plugin, so no query can leave this machine: a name outside the cluster zone simply fails.
//
// The stock coredns binary takes its plugin list from generated files (plugin.cfg); a custom
// build like this one sets the same two things itself: the directive order, and the plugins
// linked in (each registers itself from an init function).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives lists the plugins a Corefile may use, in the order CoreDNS runs them for a query:
// the same relative order as upstream's plugin.cfg (a plugin sees only what the ones after it
// answer). The kubernetes and cache plugins also link metadata, prometheus and transfer, so
// `coredns -plugins` lists those three too; as they are not listed here, a Corefile that names
// one of them is rejected ("Unknown directive"), just like one that names forward.
var directives = []string{
	"bind",   // listen on chosen addresses only
	"ready",  // GET /ready on its own port once every plugin is ready
	"health", // GET /health on its own port
	"errors",
	"log",
	"cache",
	"kubernetes", // the cluster zone, from Services and EndpointSlices
}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
