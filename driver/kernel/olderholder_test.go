package kernel

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// olderHolder is a holder of an older version, played by a proxy in front
// of a real holder: it answers "unknown op X" (closing the fds that came)
// for the ops in refuse, answers "list" without paging when flat is set
// (all IDs at once, After ignored, as a holder before paging did), and
// forwards everything else (fds both ways; a kept connection is piped).
type olderHolder struct {
	sock    string
	mu      sync.Mutex
	refused map[string]int
}

func startOlderHolder(t *testing.T, real string, refuse map[string]bool, flat bool) *olderHolder {
	t.Helper()
	o := &olderHolder{refused: map[string]int{}}
	o.sock = serveFakeHolder(t, "older.sock", func(c *net.UnixConn) { o.handle(c, real, refuse, flat) })
	return o
}

func (o *olderHolder) count(op string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.refused[op]
}

func (o *olderHolder) handle(c *net.UnixConn, real string, refuse map[string]bool, flat bool) {
	defer c.Close()
	m, err := readHolderRequest(c)
	if err != nil {
		return
	}
	var req holderReq
	if err := json.Unmarshal(m.b, &req); err != nil {
		closeAll(m.fds)
		return
	}
	if refuse[req.Op] {
		closeAll(m.fds)
		o.mu.Lock()
		o.refused[req.Op]++
		o.mu.Unlock()
		writeHolder(c, holderResp{Err: "unknown op " + req.Op}, -1)
		return
	}
	if req.Op == "list" && flat {
		ids, err := holderList(real)
		resp := holderResp{IDs: ids}
		if err != nil {
			resp.Err = err.Error()
		}
		writeHolder(c, resp, -1)
		return
	}
	rc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: real, Net: "unixpacket"})
	if err != nil {
		closeAll(m.fds)
		return
	}
	defer rc.Close()
	var oob []byte
	if len(m.fds) > 0 {
		oob = unix.UnixRights(m.fds...)
	}
	_, _, err = rc.WriteMsgUnix(m.b, oob, nil)
	closeAll(m.fds)
	if err != nil {
		return
	}
	// Pipe answers (with their fds) back, and later requests (a freeze's
	// thaw) forth, until either side closes.
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, holderMsgMax)
		for {
			n, _, _, _, err := c.ReadMsgUnix(buf, nil)
			if err != nil || n == 0 {
				rc.CloseWrite()
				return
			}
			if _, _, err := rc.WriteMsgUnix(buf[:n], nil, nil); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, holderMsgMax)
	rb := make([]byte, unix.CmsgSpace(2*4))
	for {
		n, oobn, _, _, err := rc.ReadMsgUnix(buf, rb)
		if err != nil || n == 0 {
			break
		}
		fds := parseRights(rb[:oobn])
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		_, _, err = c.WriteMsgUnix(buf[:n], oob, nil)
		closeAll(fds)
		if err != nil {
			break
		}
	}
	c.Close()
	<-done
}

// TestOlderHolderFallbacks: the plugin talking to a fuse-holder that
// predates each op it asks ("unknown op X"): configure (Attach), stat and
// capacity (Resize), fsync (SyncDevice), run (RunTool), freeze, thaw and
// sync, and a list without paging. Every one must fall back to this
// process, with the same result, no volume lost and no hang.
func TestOlderHolderFallbacks(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	size := int64(16 << 20)
	ba := newFileBackend(t, t.TempDir(), size)
	devA, err := fe.Attach(ctx, "vol-a", ba, false)
	if err != nil {
		t.Fatal(err)
	}
	realSock := fe.sock
	refuse := map[string]bool{"configure": true, "stat": true, "capacity": true, "fsync": true, "run": true,
		"freeze": true, "thaw": true, "sync": true}
	old := startOlderHolder(t, realSock, refuse, true)
	fe.sock = old.sock
	defer func() { fe.sock = realSock }()

	// configure: a second volume attached through the older holder.
	bb := newFileBackend(t, t.TempDir(), size)
	devB, err := fe.Attach(ctx, "vol-b", bb, false)
	if err != nil {
		t.Fatalf("Attach through a holder without configure: %v", err)
	}
	if old.count("configure") == 0 {
		t.Fatal("the attach never asked configure")
	}
	f, err := os.OpenFile(devB, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(4096)
	for i := range buf {
		buf[i] = 0x5a
	}
	if _, err := f.WriteAt(buf, 8192); err != nil {
		t.Fatal(err)
	}
	// fsync: SyncDevice of the raw device.
	if err := fe.SyncDevice(devB); err != nil {
		t.Fatalf("SyncDevice through a holder without fsync: %v", err)
	}
	f.Close()
	if got, err := readDirect(t, devB, 8192, 4096); err != nil || got[0] != 0x5a {
		t.Fatalf("vol-b reads %v, %v", got[:1], err)
	}
	// stat, capacity: Resize.
	size2 := size + 4<<20
	if err := ba.Grow(size2); err != nil {
		t.Fatal(err)
	}
	if err := fe.Resize(ctx, "vol-a", size2); err != nil {
		t.Fatalf("Resize through a holder without stat and capacity: %v", err)
	}
	if n, err := loopSize(devA); err != nil || n != size2 {
		t.Fatalf("vol-a's device has %d bytes (%v), want %d", n, err, size2)
	}
	if old.count("stat") == 0 || old.count("capacity") == 0 {
		t.Fatalf("Resize asked stat %d times, capacity %d times", old.count("stat"), old.count("capacity"))
	}
	// run: a tool the holder does not know how to run.
	out, exit, here, err := fe.RunTool(ctx, []string{"blockdev", "--getsize64", devA})
	if err != nil || !here {
		t.Fatalf("RunTool through a holder without run: out %q exit %d here %v err %v; want here", out, exit, here, err)
	}
	// list: both volumes, though the older holder answers without pages.
	ids := fe.Attached()
	if len(ids) != 2 || ids[0] != "vol-a" || ids[1] != "vol-b" {
		t.Fatalf("Attached: %v", ids)
	}
	fe.sock = realSock
	// Both connections are held by the real holder: a restart keeps them.
	held, err := holderList(realSock)
	if err != nil || len(held) != 2 {
		t.Fatalf("the holder keeps %v (%v), want both volumes", held, err)
	}
	for _, id := range []string{"vol-b", "vol-a"} {
		if err := fe.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}
