// Package chart holds the Go test of the csi-snap helm chart (chart_test.go):
// it renders the chart with helm and asserts on the decoded objects. The
// chart itself is the YAML next to this file; .helmignore keeps the Go files
// out of the packaged chart.
package chart
