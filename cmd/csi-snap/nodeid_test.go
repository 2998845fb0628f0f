package main

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// TestNodeIDNotUTF8: a --node-id that is not valid UTF-8 is accepted: the
// plugin opens its store and serves, yet no NodeGetInfo can ever answer
// (node_id is a proto3 string, which must be valid UTF-8, so the response
// fails to marshal), and the node never registers. run refuses what a bad
// configuration cannot survive before the store opens; this should be too.
func TestNodeIDNotUTF8(t *testing.T) {
	const bad = "node-\xff"
	cfg := testConfig(t, drivertest.NewStore())
	cfg.NodeID = bad
	cfg.MetricsAddress = ""
	opened := watchOpen(&cfg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	_, sock, _ := parseEndpoint(cfg.Endpoint)
	for {
		select {
		case err := <-done:
			if err == nil || *opened {
				t.Fatalf("run with --node-id %q: %v, store opened %v; want an error before opening", bad, err, *opened)
			}
			return // refused before opening: fine
		case <-time.After(10 * time.Millisecond):
		}
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
	}
	cc := dial(t, cfg.Endpoint)
	_, err := csi.NewNodeClient(cc).NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	cancel()
	<-done
	if err != nil {
		t.Fatalf("--node-id %q accepted (store opened %v, serving), but NodeGetInfo fails: %v", bad, *opened, err)
	}
}
