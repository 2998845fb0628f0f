package kernel

import (
	"encoding/json"
	"errors"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// TestHolderCallClosesUnaskedFD: an answer that brings an fd the request
// does not ask for (only a "get" that found its connection does: a holder
// of another version, or a broken one) must not leave that fd open in the
// asking process. holderCall returned it, and every caller but get's
// (putOnce, holderList, waitHolder, startHolder, ProbeHolder) drops what
// it returns: each such answer kept one more fd, which for a /dev/fuse fd
// keeps its connection and mount alive for as long as the plugin lives.
// The fd sent is a pipe's read end: once the asking process closed the
// copy it got, a write to the pipe fails with EPIPE.
func TestHolderCallClosesUnaskedFD(t *testing.T) {
	for _, tc := range []struct {
		op   string
		resp holderResp
	}{
		{"list", holderResp{IDs: []string{"a"}}},
		{"put", holderResp{}},
		{"drop", holderResp{}},
		{"get", holderResp{}}, // not found, yet an fd
	} {
		t.Run(tc.op, func(t *testing.T) {
			var p [2]int
			if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
				t.Fatal(err)
			}
			defer unix.Close(p[1])
			// A holder that answers one request with resp and a copy of
			// the pipe's read end.
			served := make(chan error, 1)
			sock := serveFakeHolder(t, "h.sock", func(c *net.UnixConn) {
				defer c.Close()
				buf := make([]byte, holderMsgMax)
				oob := make([]byte, unix.CmsgSpace(8))
				_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
				closeAll(parseRights(oob[:max(oobn, 0)]))
				if err != nil {
					served <- err
					return
				}
				b, _ := json.Marshal(tc.resp)
				_, _, err = c.WriteMsgUnix(b, unix.UnixRights(p[0]), nil)
				served <- err
			})
			var (
				fd  int
				err error
			)
			if tc.op == "list" {
				_, err = holderList(sock)
				fd = -1
			} else {
				_, fd, err = holderCall(sock, holderReq{Op: tc.op, ID: "a"}, -1)
			}
			if serr := <-served; serr != nil {
				t.Fatalf("the fake holder: %v", serr)
			}
			unix.Close(p[0]) // the fake holder's copy was sent; this is ours
			if err != nil {
				t.Fatalf("%s: %v", tc.op, err)
			}
			if fd >= 0 {
				t.Errorf("%s answered without a connection returned fd %d", tc.op, fd)
				unix.Close(fd)
			}
			if _, err := unix.Write(p[1], []byte("x")); !errors.Is(err, unix.EPIPE) {
				t.Errorf("%s: the fd its answer brought stays open in this process (write to the pipe: %v, want EPIPE)", tc.op, err)
			}
		})
	}
}

// TestHolderCallFoundWithoutFD: a "get" answered "found" with no fd (a
// broken holder's answer; ours always sends the connection with it, and a
// connection this process could not take is MSG_CTRUNC) is
// ErrHolderFDsLost, not a found connection whose fd is -1: held() would
// take that for a live connection it has, and the caller would serve fd -1.
func TestHolderCallFoundWithoutFD(t *testing.T) {
	served := make(chan error, 1)
	sock := serveFakeHolder(t, "h.sock", func(c *net.UnixConn) {
		defer c.Close()
		if _, _, _, _, err := c.ReadMsgUnix(make([]byte, holderMsgMax), nil); err != nil {
			served <- err
			return
		}
		served <- writeHolder(c, holderResp{Found: true, Params: json.RawMessage(`{}`)}, -1)
	})
	resp, fd, err := holderCall(sock, holderReq{Op: "get", ID: "a"}, -1)
	if serr := <-served; serr != nil {
		t.Fatalf("the fake holder: %v", serr)
	}
	if fd >= 0 {
		unix.Close(fd)
	}
	if !errors.Is(err, ErrHolderFDsLost) {
		t.Fatalf("get answered found without an fd: %+v, fd %d, %v; want ErrHolderFDsLost", resp, fd, err)
	}
}
