package kernel

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestFuseMountNotFull: a volume's FUSE mount holds one file whose size is
// fixed; it is plumbing, not storage an operator manages. Its statfs used to
// answer the file's size with no block free, so df listed every volume's
// mount at 100 % and node-exporter's filesystem alerts (which do not
// exclude fuse.* types) fired for each attached volume. It must answer a
// zero-block filesystem, which df leaves out unless asked (-a) and which
// no "almost full" rule can match (its size is 0).
func TestFuseMountNotFull(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-statfs"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	if _, err := fe.Attach(ctx, id, b, false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Detach(ctx, id) })
	mp := fe.mountpoint(id)
	var st unix.Statfs_t
	if err := unix.Statfs(mp, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks != 0 {
		t.Errorf("statfs of the FUSE mount %s: %d blocks, %d free, %d available; want a zero-block filesystem", mp, st.Blocks, st.Bfree, st.Bavail)
	}
	if st.Bsize == 0 || st.Namelen == 0 {
		t.Errorf("statfs of %s: bsize %d, namelen %d; want both set", mp, st.Bsize, st.Namelen)
	}
	if _, err := exec.LookPath("df"); err != nil {
		t.Logf("no df: %v", err)
		return
	}
	// df stats every mount: one whose FUSE server is gone for good (left
	// by a test killed half way) would hold it forever, and with it the
	// whole package until its timeout. A minute is ample otherwise.
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(dctx, "df", "--output=target").CombinedOutput()
	if dctx.Err() != nil {
		t.Fatalf("df did not finish in a minute: a mount on this machine does not answer (a FUSE mount nobody serves? see /sys/fs/fuse/connections/*/waiting)\n%s", out)
	}
	if err != nil {
		t.Fatalf("df: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(line) == mp {
			t.Errorf("df (without -a) lists the FUSE mount %s", mp)
		}
	}
}
