package kernel

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHolderClosedBeforeRequest: a holder that goes away after our
// connect and before our request is sent (killed; or a child holder
// emptied by another volume's drop, whose closed listener resets the
// connections still in its backlog) is a holder that did not answer,
// like one that closed before its answer: holderAsk asks again, and
// finds it absent. Such a send failed with ECONNRESET or EPIPE, which
// holderCall returned as a plain error: holderAsk did not retry, and a
// Detach (holderDrop) or an Attach ("get") failed although the holder was
// simply gone (seen in TestHolderKillsDuringAttachDetach:
// "holder drop: write unixpacket: sendmsg: connection reset by peer").
//
// The fake holder here accepts each connection and at once shuts its
// reading side (the client's send then fails with EPIPE) or closes the
// listener with the connection unaccepted (ECONNRESET), then listens
// again; the first time a send failed, the socket is left removed, so a
// retry finds the holder absent.
func TestHolderClosedBeforeRequest(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	listen := func() int {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		unix.Unlink(sock)
		if err := unix.Bind(fd, &unix.SockaddrUnix{Name: sock}); err != nil {
			t.Fatal(err)
		}
		if err := unix.Listen(fd, 16); err != nil {
			t.Fatal(err)
		}
		return fd
	}
	deadline := time.Now().Add(6 * time.Second)
	tries, sendFailed := 0, 0
	for time.Now().Before(deadline) && tries < 300 && sendFailed < 20 {
		ln := listen()
		mode := tries % 2
		done := make(chan struct{})
		go func() {
			defer close(done)
			if mode == 0 {
				c, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
				if err == nil {
					unix.Shutdown(c, unix.SHUT_RD)
					time.Sleep(2 * time.Millisecond)
					unix.Close(c)
				}
				unix.Unlink(sock)
				unix.Close(ln)
				return
			}
			pfd := []unix.PollFd{{Fd: int32(ln), Events: unix.POLLIN}}
			unix.Poll(pfd, 5000)
			unix.Unlink(sock)
			unix.Close(ln) // the queued connection is reset
		}()
		tries++
		if tries%3 == 0 {
			// A request the holder does instead of us (askHolder: run,
			// configure, stat, sync): not sent, it is ours to do
			// (here), not "the holder went away during the request".
			c, _, here, err := askHolder(context.Background(), sock, holderReq{Op: "run", Args: []string{"blkid", "/dev/loop0"}})
			<-done
			if c != nil {
				c.Close()
			}
			if err != nil && strings.Contains(err.Error(), "sendmsg") {
				sendFailed++
				t.Errorf("try %d (mode %d): askHolder: %v (here %v); want here, nothing having been sent", tries, mode, err, here)
			}
			continue
		}
		_, fd, err := holderAsk(sock, holderReq{Op: "drop", ID: "x"})
		closeFD(fd)
		<-done
		if err == nil {
			t.Fatalf("the fake holder answered?")
		}
		if !errors.Is(err, errNoHolder) {
			sendFailed++
			t.Errorf("try %d (mode %d): a holder gone before our request was sent: %v; want it asked again and found absent (errNoHolder)", tries, mode, err)
		}
		if errors.Is(err, errNoHolder) && !holderAbsent(err) {
			t.Errorf("try %d (mode %d): %v: asked again, the socket is gone: want it found absent", tries, mode, err)
		}
	}
	t.Logf("%d tries, %d sends failed with a plain error", tries, sendFailed)
}
