package kernel

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestHolderPutAtItsFDLimit: a holder at its fd limit takes a put's
// connection but not the fd that comes with it (MSG_CTRUNC), and refuses
// the put naming the loss (serveHolderConn). The plugin's call must then
// fail with ErrHolderFDsLost, "a passing shortage; a retry may succeed"
// (the driver answers it Unavailable), as it does when the loss is on its
// own side (TestHolderAnswerWithLostFD). It was a plain error, with the
// sentinel's text in it: an attach's hand-over failing so answered
// NodeStage with Internal. The holder runs in a process of its own, whose
// limit the test lowers.
func TestHolderPutAtItsFDLimit(t *testing.T) {
	requireRoot(t) // lowering another process's limit
	sock := filepath.Join(t.TempDir(), "h.sock")
	cmd := exec.Command(testHolderCommand()[0], "fuse-holder", "--socket", sock, "--stay")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitListed(t, sock)
	top := 0
	for _, e := range settledFDs(strconv.Itoa(cmd.Process.Pid)) {
		n, _ := strconv.Atoi(e[:strings.Index(e, "->")])
		top = max(top, n)
	}
	lim := unix.Rlimit{Cur: uint64(top + 4), Max: uint64(top + 4)}
	if err := unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, &lim, nil); err != nil {
		t.Fatal(err)
	}
	params := paramsJSON(&connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true})
	for i := range 16 {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		_, _, err := holderCall(sock, holderReq{Op: "put", ID: fmt.Sprintf("v%d", i), Params: params}, p[0])
		closeAll(p[:])
		if err == nil {
			continue
		}
		t.Logf("put %d: %v", i, err)
		if !errors.Is(err, ErrHolderFDsLost) {
			t.Errorf("a put the holder refused for the fd it could not take: %v; want ErrHolderFDsLost", err)
		}
		return
	}
	t.Fatalf("16 puts into a holder limited to %d fds all succeeded", top+4)
}
