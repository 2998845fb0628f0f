package kernel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"
)

// TestStaleLoopRegistry: loop registries that name another volume's device
// (after a reboot with the run dir on disk, the numbers belong to whoever
// attached them since) are not taken for ours, as a restarted plugin's
// container sees them: from another mount namespace, where every device's
// backing_file reads "/". A child in a PID and mount namespace of its own
// (a plugin container) serves vol-b and then vol-a, and is SIGKILLed (the
// container restarts) after making the kernel forget vol-b's file
// attributes (a Resize cut off by the kill), so that a status ioctl on
// vol-b's device stats its file and waits until someone serves vol-b.
// Registries are then left naming vol-b's device: vol-c's from another
// boot, vol-d's of the older format without a boot or mount number (vol-c
// and vol-d were never attached in this boot), and an extra entry in
// vol-a's with a mount number other than vol-a's mount. The next plugin's
// Attached lists vol-a and vol-b only (it used to list vol-c and vol-d, so
// Recover attached volumes nobody staged, which then refused deletes), and
// its resume of vol-a, before vol-b's (Recover's order), returns without
// asking vol-b's device (it used to wait there for good: start-up blocked
// until someone aborted vol-b's connection).
func TestStaleLoopRegistry(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir, data := t.TempDir(), t.TempDir()
	if d, err := filepath.EvalSymlinks(runDir); err == nil {
		runDir = d
	}
	sharedDir(t, runDir)
	const size = 16 << 20
	startStayHolder(t, runDir)
	aFile, bFile := filepath.Join(data, "a.img"), filepath.Join(data, "b.img")
	c := startChildAttr(t, ownPIDNamespace, runDir, bFile, "vol-b", size, "-external", "-check", "1h", "-own-mounts",
		"-inval-on-usr2", "-id2", "vol-a", "-backing2", aFile)
	t.Cleanup(func() { c.cmd.Process.Kill() })
	devB := c.expect(t, "DEVICE ")
	devA := c.expect(t, "DEVICE2 ")
	c.cmd.Process.Signal(syscall.SIGUSR2)
	if got := c.expect(t, "INVALIDATED "); got != "<nil>" {
		t.Fatalf("invalidating vol-b's attributes: %s", got)
	}
	c.cmd.Process.Kill()
	c.wait(t)

	fe, err := New(Config{RunDir: runDir, ExternalHolder: true})
	if err != nil {
		t.Fatal(err)
	}
	mpB := fe.mountpoint("vol-b")
	abortB := filepath.Join(fuseConnDir(t, mpB), "abort")
	if bf, _ := readSysfs(mustLoopNumber(t, devB), "loop/backing_file"); bf != "/" {
		t.Fatalf("vol-b's %s reads backing file %q here, want \"/\" (attached from another mount namespace)", devB, bf)
	}
	regA := fe.mountpoint("vol-a") + ".loops"
	old, err := os.ReadFile(regA)
	if err != nil {
		t.Fatal(err)
	}
	for path, content := range map[string]string{
		fe.mountpoint("vol-c") + ".loops": "boot 00000000-0000-0000-0000-000000000000\n" + devB + " 0:1\n",
		fe.mountpoint("vol-d") + ".loops": devB + "\n",
		regA:                              string(old) + devB + " 0:1\n",
	} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	bA, err := OpenFileBackend(aFile, size)
	if err != nil {
		t.Fatal(err)
	}
	defer bA.Close()
	bB, err := OpenFileBackend(bFile, size)
	if err != nil {
		t.Fatal(err)
	}
	defer bB.Close()
	t.Cleanup(func() {
		for _, id := range []string{"vol-a", "vol-b", "vol-c", "vol-d"} {
			if err := fe.Detach(ctx, id); err != nil {
				t.Errorf("detach %s: %v", id, err)
			}
		}
		fe.Close()
	})
	if got := fe.Attached(); !slices.Equal(got, []string{"vol-a", "vol-b"}) {
		t.Errorf("Attached() = %v, want [vol-a vol-b]: a registry naming another volume's device counted", got)
	}
	for _, v := range []struct {
		id, want string
		b        Backend
	}{{"vol-a", devA, bA}, {"vol-b", devB, bB}} {
		done := make(chan string, 1)
		go func() {
			dev, err := fe.Attach(ctx, v.id, v.b, false)
			done <- fmt.Sprint(dev, " ", err)
		}()
		select {
		case got := <-done:
			if want := v.want + " <nil>"; got != want {
				t.Errorf("resume of %s: %s, want %s", v.id, got, want)
			}
		case <-time.After(20 * time.Second): // hang guard
			os.WriteFile(abortB, []byte("1"), 0)
			t.Fatalf("resume of %s waited 20 s (on vol-b's unserved device, which its registry named); vol-b's connection aborted: %s", v.id, <-done)
		}
	}
}

func mustLoopNumber(t *testing.T, dev string) int {
	t.Helper()
	n, err := loopNumber(dev)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestLoopRegistryFormat: what registeredLoops reads from each form of a
// registry file, and that registerLoop writes the boot line, drops a
// registry of another boot and renumbers an entry of another mount.
func TestLoopRegistryFormat(t *testing.T) {
	if BootID() == "" {
		skipOrFail(t, "SKIPPED: no /proc/sys/kernel/random/boot_id: registries carry no boot")
	}
	path := filepath.Join(t.TempDir(), "vol-x")
	for _, tc := range []struct{ content, want string }{
		{"/dev/loop3\n/dev/loop4\n", "map[/dev/loop3:{0} /dev/loop4:{0}]"},                                                  // before boot lines
		{"boot " + BootID() + "\n/dev/loop5 7:9\n/dev/loop6\n", fmt.Sprintf("map[/dev/loop5:{%d} /dev/loop6:{0}]", 7<<8|9)}, // Mkdev(7, 9)
		{"boot 00000000-0000-0000-0000-000000000000\n/dev/loop5 7:9\n", "map[]"},                                            // another boot
		{"boot\n/dev/loop5\n", "map[]"}, // a boot line without its id
		{"/dev/sda\n/dev/loop1 x\n/dev/loop2 1:2 3\nboot " + BootID() + "\n", "map[/dev/loop1:{0}]"}, // not ours, bad fields, a late boot line
	} {
		if err := os.WriteFile(path+".loops", []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(registeredLoops(path)); got != tc.want {
			t.Errorf("registry %q reads %s, want %s", tc.content, got, tc.want)
		}
	}
	os.WriteFile(path+".loops", []byte("boot 00000000-0000-0000-0000-000000000000\n/dev/loop5 7:9\n"), 0o600)
	registerLoop(path, "/dev/loop8", true) // not a mount: no mount number
	if b, _ := os.ReadFile(path + ".loops"); string(b) != "boot "+BootID()+"\n/dev/loop8\n" {
		t.Errorf("registry after an add over another boot's: %q", b)
	}
	// The same number left by an earlier mount: it takes the number of
	// the mount now at path (none here).
	os.WriteFile(path+".loops", []byte("boot "+BootID()+"\n/dev/loop8 7:9\n"), 0o600)
	registerLoop(path, "/dev/loop8", true)
	if b, _ := os.ReadFile(path + ".loops"); string(b) != "boot "+BootID()+"\n/dev/loop8\n" {
		t.Errorf("registry after an add over an entry of another mount: %q", b)
	}
	registerLoop(path, "/dev/loop8", false)
	if _, err := os.Stat(path + ".loops"); !os.IsNotExist(err) {
		t.Errorf("registry after its last device was removed: %v", err)
	}
}
