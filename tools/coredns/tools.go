//go:build tools

// Package tools pins CoreDNS for meshbridge's kube tests (built with tools/build.sh).
package tools

import _ "github.com/coredns/coredns"
