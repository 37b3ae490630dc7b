//go:build tools

// Package tools pins helm for meshbridge's chart tests (built with tools/build.sh).
package tools

import _ "helm.sh/helm/v4/cmd/helm"
