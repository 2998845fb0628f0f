package driver_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// silentHolderFrontend is drivertest's Frontend behind a fuse-holder that
// may not answer, as the kernel frontend is: ServeHeld and Unserved ask
// the holder (kernel.Frontend.ServeHeld's and held's "get"), each ask
// waiting for its timeout (10 s) while it is silent; asks counts them.
type silentHolderFrontend struct {
	*drivertest.Frontend
	mu     sync.Mutex
	silent bool
	asks   int
}

func (f *silentHolderFrontend) ask() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.silent {
		f.asks++
	}
	return f.silent
}

func (f *silentHolderFrontend) ServeHeld(ctx context.Context, id string, b driver.Backend) (bool, error) {
	if f.ask() {
		return false, fmt.Errorf("holder get: %w", driver.ErrNoAnswer)
	}
	return false, nil
}

// Unserved: a silent holder leaves it unknown, reported unserved
// (kernel.Frontend.Unserved).
func (f *silentHolderFrontend) Unserved(id string) bool {
	if _, ok := f.Device(id); ok && f.ask() {
		return true
	}
	return f.Frontend.Unserved(id)
}

func (f *silentHolderFrontend) Asks() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.asks
}

// TestRecoverAsksSilentHolderOnceWithUnserved: Recover finds the
// fuse-holder silent at its first ask (ServeHeld) and asks it nothing
// more for the attaches; but it then asked it again for every volume, to
// list those left unserved (Frontend.Unserved asks the holder: another
// timeout per held volume before any CSI call is served).
func TestRecoverAsksSilentHolderOnceWithUnserved(t *testing.T) {
	st, base, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	fe := &silentHolderFrontend{Frontend: base}
	opt := driver.Options{
		Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}},
	}
	d, err := driver.New(opt)
	if err != nil {
		t.Fatal(err)
	}
	e := env{d, st, base, fm}
	var ids []string
	for i := range 4 {
		id, _ := e.attachNew(t, fmt.Sprintf("silent-%d", i))
		ids = append(ids, id)
		base.SetUnserved(id)
	}
	base.SetAttachErr(fmt.Errorf("holder get: %w", driver.ErrNoAnswer))
	fe.silent = true
	d2, err := driver.New(opt)
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Recover(context.Background()); err == nil {
		t.Fatal("Recover with a silent holder reported no error")
	}
	if n := fe.Asks() + base.Attaches() - 4; n != 1 {
		t.Errorf("Recover asked the silent holder %d times (each waits 10 s), want once", n)
	}

	// Once it answers, every device is taken back.
	fe.mu.Lock()
	fe.silent = false
	fe.mu.Unlock()
	base.SetAttachErr(nil)
	done := make(chan struct{})
	go func() { defer close(done); d2.TakeBackUnserved(context.Background(), time.Millisecond) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("TakeBackUnserved did not end after the holder answered")
	}
	for _, id := range ids {
		if base.Unserved(id) {
			t.Errorf("%s still unserved", id)
		}
	}
}

// TestTakeBackUnservedDetachesVolumeStoreLacks: a held device of a volume
// the store does not know is detached by Recover; but one left "not
// asked" behind a silent holder was never detached: once the holder
// answered, TakeBackUnserved tried to take it back every interval for
// good (the store has no backend for it: FailedPrecondition), and never
// ended, the device attached and its I/O waiting.
func TestTakeBackUnservedDetachesVolumeStoreLacks(t *testing.T) {
	e, restart := restartableEnv(t)
	a, _ := e.attachNew(t, "lacks-a")
	x, _ := e.attachNew(t, "lacks-b")
	if x < a {
		a, x = x, a // a is asked first (Attached is sorted)
	}
	e.fe.SetUnserved(a)
	e.fe.SetUnserved(x)
	if err := e.store.DeleteVolume(x); err != nil {
		t.Fatal(err)
	}
	e.fe.SetAttachErr(fmt.Errorf("holder get: %w", driver.ErrNoAnswer))
	d2 := restart()
	if err := d2.Recover(context.Background()); err == nil {
		t.Fatal("Recover with a silent holder reported no error")
	}
	e.fe.SetAttachErr(nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); d2.TakeBackUnserved(ctx, time.Millisecond) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cancel()
		<-done
		t.Error("TakeBackUnserved still tries to take back a volume the store does not know after 5 s")
	}
	if e.fe.Unserved(a) {
		t.Errorf("%s still unserved", a)
	}
	if dev, ok := e.fe.Device(x); ok {
		t.Errorf("the held device %s of %s, which the store does not know, is still attached (Recover detaches it when asked)", dev, x)
	}
}
