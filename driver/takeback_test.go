package driver_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// TestRecoverLeavesSlowHolderAndTakesBackLater: a restart finds its
// fuse-holder not answering (stopped, starved: each call waits for its
// timeout, 10 s). Recover used to ask it again for every volume it held
// (ServeHeld, then Attach: 20-30 s per volume before the plugin served any
// CSI call), and left them unserved with nothing taking a running pod's
// device back until the CO's next call on that volume. Now Recover asks
// once, leaves the rest, and TakeBackUnserved takes them all back once the
// holder answers, without any CSI call.
func TestRecoverLeavesSlowHolderAndTakesBackLater(t *testing.T) {
	e, restart := restartableEnv(t)
	fe := e.fe
	var ids []string
	for i := range 3 {
		id, _ := e.attachNew(t, fmt.Sprintf("held-%d", i))
		ids = append(ids, id)
	}

	// The restart: every device held, none served, the holder silent.
	for _, id := range ids {
		fe.SetUnserved(id)
	}
	fe.SetAttachErr(fmt.Errorf("holder get: %w", driver.ErrNoAnswer))
	d2 := restart()
	before := fe.Attaches()
	if err := d2.Recover(context.Background()); err == nil {
		t.Fatal("Recover with a holder that does not answer reported no error")
	}
	if n := fe.Attaches() - before; n != 1 {
		t.Errorf("Recover asked a holder that did not answer %d times (once per held volume?), want once", n)
	}
	for _, id := range ids {
		if !fe.Unserved(id) {
			t.Fatalf("%s served though its holder never answered", id)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); d2.TakeBackUnserved(ctx, 5*time.Millisecond) }()
	// Still silent: tried again, a round at a time, nothing served.
	deadline := time.Now().Add(10 * time.Second)
	for fe.Attaches()-before < 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	for _, id := range ids {
		if !fe.Unserved(id) {
			t.Fatalf("%s served though its holder never answered", id)
		}
	}
	select {
	case <-done:
		t.Fatal("TakeBackUnserved returned with every device still unserved")
	default:
	}

	// The holder answers again: every device is taken back, with no CSI
	// call on any of them, and the loop ends.
	fe.SetAttachErr(nil)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("TakeBackUnserved did not return after the holder answered again")
	}
	for _, id := range ids {
		if fe.Unserved(id) {
			t.Errorf("%s still unserved after the holder answered again", id)
		}
	}
}

// TestTakeBackUnservedStops: with nothing left unserved TakeBackUnserved
// returns at once, and it stops when its context ends even while devices
// stay unserved.
func TestTakeBackUnservedStops(t *testing.T) {
	e, restart := restartableEnv(t)
	if err := e.d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); e.d.TakeBackUnserved(context.Background(), time.Hour) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("TakeBackUnserved with nothing left unserved did not return")
	}

	id, _ := e.attachNew(t, "stays-unserved")
	e.fe.SetUnserved(id)
	e.fe.SetAttachErr(fmt.Errorf("holder get: %w", driver.ErrUnavailable))
	d2 := restart()
	if err := d2.Recover(context.Background()); err == nil {
		t.Fatal("Recover with a failing Attach reported no error")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done = make(chan struct{})
	go func() { defer close(done); d2.TakeBackUnserved(ctx, time.Millisecond) }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("TakeBackUnserved did not stop when its context ended")
	}
	if !e.fe.Unserved(id) {
		t.Error("served though every Attach failed")
	}
}

// restartableEnv is newEnv with a function that makes a new driver on the
// same store, frontend and data dir: the plugin restarted.
func restartableEnv(t *testing.T) (env, func() *driver.Driver) {
	t.Helper()
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	opt := driver.Options{
		Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}},
	}
	restart := func() *driver.Driver {
		t.Helper()
		d, err := driver.New(opt)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	return env{restart(), st, fe, fm}, restart
}
