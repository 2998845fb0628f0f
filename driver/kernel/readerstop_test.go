package kernel

import (
	"bytes"
	"errors"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// slowMemBackend is a memBackend whose reads take up to 300 µs, so that
// readers are busy now and then and others start.
type slowMemBackend struct {
	memBackend
	n atomic.Uint64
}

func (m *slowMemBackend) ReadAt(p []byte, off int64) (int, error) {
	if n := m.n.Add(1); n%3 == 0 {
		time.Sleep(time.Duration(n%300) * time.Microsecond)
	}
	return m.memBackend.ReadAt(p, off)
}

// TestStopWhileReadersComeAndGo: a server on one end of a SOCK_SEQPACKET
// pair (a stand-in for /dev/fuse: one request per read, one reply per
// write), with readerIdle 1 ms and Readers 4, is stopped again and again
// while bursts of READs make readers start (spawn, from a reader, while
// stop waits for the readers: wg.Add against wg.Wait) and return
// (idleExit). stop must return, with no reader left counted, and every
// reply must carry the right bytes for its request. Run under -race by
// hack/test.sh's readers pass (TestReaders*).
func TestStopWhileReadersComeAndGo(t *testing.T) {
	old := readerIdle
	t.Cleanup(func() { readerIdle = old })
	readerIdle = time.Millisecond
	const size = 1 << 20
	data := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(data)
	rounds := 200
	if testing.Short() {
		rounds = 60
	}
	rnd := rand.New(rand.NewSource(time.Now().UnixNano()))
	for r := 0; r < rounds; r++ {
		sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		kfd := sp[1]
		b := &slowMemBackend{memBackend: memBackend{b: data}}
		srv, err := newServer(sp[0], b, false, &connParams{Initialized: true, MaxWrite: maxWrite})
		if err != nil {
			t.Fatal(err)
		}
		srv.start(4)
		var sent sync.Map // unique -> offset
		stopSend := make(chan struct{})
		var wg sync.WaitGroup
		var bad atomic.Value
		wg.Add(2)
		go func() { // the "kernel" writing requests, in bursts
			defer wg.Done()
			rr := rand.New(rand.NewSource(int64(r)))
			for u := uint64(1); ; u++ {
				select {
				case <-stopSend:
					return
				default:
				}
				off := int64(rr.Intn(size/4096)) * 4096
				body := make([]byte, readInSize)
				le.PutUint64(body[8:], uint64(off))
				le.PutUint32(body[16:], 4096)
				sent.Store(u, off)
				if err := unix.Sendmsg(kfd, request(opRead, u<<1, body), nil, nil, unix.MSG_DONTWAIT); err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EPIPE) {
					bad.Store(err.Error())
					return
				}
				if rr.Intn(16) == 0 {
					time.Sleep(time.Duration(rr.Intn(2000)) * time.Microsecond)
				}
			}
		}()
		go func() { // the "kernel" taking replies
			defer wg.Done()
			buf := make([]byte, outHeaderSize+8192)
			for {
				n, _, err := unix.Recvfrom(kfd, buf, 0)
				if err != nil || n == 0 {
					return // kfd shut down at the end of the round
				}
				u := le.Uint64(buf[8:]) >> 1
				o, ok := sent.Load(u)
				if !ok || n != outHeaderSize+4096 || replyErrno(buf) != 0 {
					bad.Store("bad reply")
					return
				}
				off := o.(int64)
				if !bytes.Equal(buf[outHeaderSize:n], data[off:off+4096]) {
					bad.Store("reply with the wrong bytes")
					return
				}
			}
		}()
		time.Sleep(time.Duration(rnd.Intn(5000)) * time.Microsecond)
		stopped := make(chan struct{})
		go func() { srv.stop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: stop did not return: %d readers alive, %d waiting", r, srv.aliveReaders(), srv.waitingReaders())
		}
		if a, w := srv.aliveReaders(), srv.waitingReaders(); a != 0 || w != 0 {
			t.Fatalf("round %d: after stop %d readers alive, %d waiting", r, a, w)
		}
		close(stopSend)
		unix.Shutdown(kfd, unix.SHUT_RDWR)
		wg.Wait()
		unix.Close(sp[0])
		unix.Close(kfd)
		if v := bad.Load(); v != nil {
			t.Fatalf("round %d: %v", r, v)
		}
	}
}
