package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Tests of the deferred copy (FORMAT.md, "First write to chunk c after
// snapshot Sn"): the committer writes a first write's copy of the old
// chunk, and only after the copy and its record are durable does the new
// data reach the data file.

// ioEvent is one parsed entry of faultFS.ios.
type ioEvent struct {
	kind     string // wstart, wdone, sstart, sdone
	name     string
	off, len int64
}

func parseIOs(t *testing.T, ios []string) []ioEvent {
	t.Helper()
	out := make([]ioEvent, len(ios))
	for i, s := range ios {
		f := strings.Fields(s)
		if f[1] == logTmpName { // a log made by a checkpoint keeps its temp name open
			f[1] = logName
		}
		out[i] = ioEvent{kind: f[0], name: f[1]}
		if len(f) == 4 {
			fmt.Sscan(f[2], &out[i].off)
			fmt.Sscan(f[3], &out[i].len)
		}
	}
	return out
}

// TestApplyAfterDurableCopy records every write and sync the store makes
// while concurrent first writes (partial and whole chunks, one spanning
// several) run after a snapshot, and checks for each written chunk c, with
// k the COW chunk the snapshot maps it to, that before the first write to
// c's bytes in the data file starts: the copy was written to COW chunk k;
// after that a log write (the batch) started; then a sync of the log and
// a sync of the COW file both started after those writes were done and
// completed. It fails if the apply can reach the data file before the
// record and the copy are durable.
func TestApplyAfterDurableCopy(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	const cs, n = 4096, 64
	v, err := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(7))
	old := make([]byte, n*cs)
	rng.Read(old)
	v.WriteAt(old, 0)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	stopIOs := fs.recordIOs()
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := g; c < 48; c += 4 {
				off, m := int64(c)*cs+int64(100*g), 1000
				if c%3 == 0 {
					off, m = int64(c)*cs, cs // whole chunk
				}
				if _, err := v.WriteAt(fill(m, byte(c)), off); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if _, err := v.WriteAt(fill(5*cs, 0xEE), 50*cs+10); err != nil { // chunks 50..55
		t.Error(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	ios := stopIOs()
	ev := parseIOs(t, ios)
	sn, _ := s.Snapshot("s")
	dataName, cowName := v.dataName, v.cowName
	written := []int64{}
	for c := int64(0); c < 48; c++ {
		written = append(written, c)
	}
	for c := int64(50); c <= 55; c++ {
		written = append(written, c)
	}
	applies := 0
	for _, c := range written {
		v.mu.RLock()
		k, ok := sn.idx.Lookup(exceptions.Chunk(c))
		v.mu.RUnlock()
		if !ok || k == 0 {
			t.Fatalf("chunk %d: mapped %v to COW chunk %d, want a real copy", c, ok, k)
		}
		// The first data-file write touching chunk c.
		i := -1
		for j, e := range ev {
			if e.kind == "wstart" && e.name == dataName && e.off < (c+1)*cs && c*cs < e.off+e.len {
				i = j
				break
			}
		}
		if i < 0 {
			t.Fatalf("chunk %d never reached the data file", c)
		}
		applies++
		// The copy, done before i.
		a := -1
		for j := 0; j < i; j++ {
			// The copy may be part of a run of consecutive chunks (writeCopies).
			if e := ev[j]; e.kind == "wdone" && e.name == cowName && e.off <= int64(k)*cs && int64(k+1)*cs <= e.off+e.len {
				a = j
				break
			}
		}
		if a < 0 {
			t.Fatalf("chunk %d: data file written (event %d: %v) before its copy to COW chunk %d was written", c, i, ios[i], k)
		}
		// A log write after the copy, done before i.
		b := -1
		for j := a + 1; j < i; j++ {
			if e := ev[j]; e.kind == "wstart" && e.name == logName {
				b = j
				break
			}
		}
		if b < 0 {
			t.Fatalf("chunk %d: data file written (event %d) with no log write between its copy (event %d) and it", c, i, a)
		}
		// Both files synced: a sync started after the writes were done and
		// completed before i.
		for _, name := range []string{logName, cowName} {
			durable := false
			for j := b + 1; j < i && !durable; j++ {
				if ev[j].kind != "sstart" || ev[j].name != name {
					continue
				}
				if name == logName && !doneBefore(ev, b, j) {
					continue // the batch write was still running
				}
				for k := j + 1; k < i; k++ {
					if ev[k].kind == "sdone" && ev[k].name == name {
						durable = true
						break
					}
				}
			}
			if !durable {
				t.Fatalf("chunk %d: data file written (event %d) before %s was synced after the copy (event %d) and batch (event %d)", c, i, name, a, b)
			}
		}
	}
	if applies != len(written) {
		t.Fatalf("checked %d applies, want %d", applies, len(written))
	}
	t.Logf("%d first writes checked against %d recorded I/O events", applies, len(ev))
	// And the images are right.
	want := bytes.Clone(old)
	for c := 0; c < 48; c++ {
		off, m := c*cs+100*(c%4), 1000
		if c%3 == 0 {
			off, m = c*cs, cs
		}
		copy(want[off:off+m], fill(m, byte(c)))
	}
	copy(want[50*cs+10:], fill(5*cs, 0xEE))
	if got := mustRead(t, v, 0, n*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d", firstDiff(got, want))
	}
	if got := mustRead(t, sn, 0, n*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d", firstDiff(got, old))
	}
}

// doneBefore reports whether the write started at event w completed before
// event j.
func doneBefore(ev []ioEvent, w, j int) bool {
	for k := w + 1; k < j; k++ {
		if ev[k].kind == "wdone" && ev[k].name == ev[w].name && ev[k].off == ev[w].off && ev[k].len == ev[w].len {
			return true
		}
	}
	return false
}

// TestSnapshotReadsPendingCopy holds the committer inside its write of a
// pending copy: the snapshot (and a clone of it) must read the old chunk
// from the pending copy, since the COW chunk does not hold it yet (checked),
// while the volume reads the new data; once released, everything is
// durable and right.
func TestSnapshotReadsPendingCopy(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, func(f *faultFS) { f.noSync = true })
	defer s.Close()
	const cs = 4096
	v, _ := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	old := fill(8*cs, 1)
	v.WriteAt(old, 0)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s")
	c, err := s.CloneSnapshot("s", "c", 8*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	held := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	fs.mu.Lock()
	fs.writeHook = func(name string) {
		if strings.HasSuffix(name, ".cow") {
			once.Do(func() { close(held); <-release })
		}
	}
	fs.mu.Unlock()
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	if _, err := v.WriteAt(fill(100, 2), 3*cs+50); err != nil {
		t.Fatal(err)
	}
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the committer never wrote the pending copy")
	}
	// The COW chunk does not hold the copy yet: a read of it would be wrong.
	v.mu.RLock()
	k, _ := sn.idx.Lookup(3)
	v.mu.RUnlock()
	f, _ := v.cowFile()
	disk := make([]byte, cs)
	readFull(f, disk, int64(k)*cs)
	if bytes.Equal(disk, old[3*cs:4*cs]) {
		t.Fatal("the COW chunk already holds the copy: the test would not tell the pending copy from it")
	}
	want := bytes.Clone(old)
	copy(want[3*cs+50:], fill(100, 2))
	for i := 0; i < 2; i++ {
		if got := mustRead(t, sn, 0, 8*cs); !bytes.Equal(got, old) {
			t.Fatalf("snapshot differs at %d while its copy is pending", firstDiff(got, old))
		}
		if got := mustRead(t, c, 0, 8*cs); !bytes.Equal(got, old) {
			t.Fatalf("clone of the snapshot differs at %d while the copy is pending", firstDiff(got, old))
		}
		if got := mustRead(t, v, 0, 8*cs); !bytes.Equal(got, want) {
			t.Fatalf("volume differs at %d while the copy is pending", firstDiff(got, want))
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			released = true
			close(release)
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			readFull(f, disk, int64(k)*cs)
			if !bytes.Equal(disk, old[3*cs:4*cs]) {
				t.Fatalf("COW chunk %d differs from the old chunk at %d after Flush", k, firstDiff(disk, old[3*cs:4*cs]))
			}
		}
	}
}

// TestSnapshotReadRacesApply: readers of a snapshot (and of the volume)
// run while first writes' copies are pending and while the committer
// applies them (taking the pending copy away): every read sees the old
// data, or the new, whole. Run with -race: the pending copy is shared
// between readers and the committer.
func TestSnapshotReadRacesApply(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSlow(t, dir, 2*time.Millisecond)
	defer s.Close()
	const cs, n = 4096, 32
	v, _ := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	cur := make([]byte, n*cs)
	rand.New(rand.NewSource(9)).Read(cur)
	v.WriteAt(cur, 0)
	var duringPending, afterApply atomic.Int64
	for round := 0; round < 6; round++ {
		id := fmt.Sprint("s", round)
		sn, err := s.CreateSnapshot("v", id, SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		old := bytes.Clone(cur)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for r := 0; r < 3; r++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, cs)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					c := int64((i*7 + r*5) % n)
					pending := v.ovN.Load() > 0
					if _, err := sn.ReadAt(buf, c*cs); err != nil {
						t.Error(err)
						return
					}
					if !bytes.Equal(buf, old[c*cs:(c+1)*cs]) {
						t.Errorf("round %d: snapshot chunk %d differs at %d", round, c, firstDiff(buf, old[c*cs:(c+1)*cs]))
						return
					}
					if pending && v.ovN.Load() > 0 {
						duringPending.Add(1)
					} else if v.ovN.Load() == 0 {
						afterApply.Add(1)
					}
				}
			}()
		}
		for c := int64(0); c < n; c++ {
			p := fill(cs/2, byte(round*n+int(c)))
			if _, err := v.WriteAt(p, c*cs+int64(round*100)); err != nil {
				t.Fatal(err)
			}
			copy(cur[c*cs+int64(round*100):], p)
			time.Sleep(100 * time.Microsecond) // spread the batches out
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
		close(stop)
		wg.Wait()
		if got := mustRead(t, v, 0, n*cs); !bytes.Equal(got, cur) {
			t.Fatalf("round %d: volume differs at %d", round, firstDiff(got, cur))
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("snapshot reads: %d while copies were pending, %d after they were applied", duringPending.Load(), afterApply.Load())
	if duringPending.Load() == 0 || afterApply.Load() == 0 {
		t.Fatalf("reads while pending %d, after apply %d: the race was not exercised", duringPending.Load(), afterApply.Load())
	}
}

// TestPipelineOverlapKeepsOrder holds the log sync of a first write's batch
// N and makes a second first write (batch N+1): the committer's pipeline
// must write N+1's copy to the COW file meanwhile (the overlap), but must
// neither write N+1 to the log nor apply either write to the data file
// before N's sync returns. Then N's log sync fails: neither chunk may ever
// reach the data file, every later Flush fails, and after a reopen the
// snapshot and the volume read the old chunks.
func TestPipelineOverlapKeepsOrder(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs, n = 4096, 16
	v, err := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := make([]byte, n*cs)
	rand.New(rand.NewSource(11)).Read(old)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	isLog := func(name string) bool { return name == logName || name == logTmpName } // a checkpointed log keeps its temp name
	h := newHold(t, isLog)
	var failLog atomic.Bool
	var ios []string
	fs.mu.Lock()
	fs.syncHook = h.hook
	fs.syncErr = func(name string) error {
		if isLog(name) && failLog.Load() {
			return errInjected
		}
		return nil
	}
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 1), 1*cs); err != nil { // batch N
		t.Fatal(err)
	}
	h.wait(t) // N is in the log; its log sync has not returned
	fs.mu.Lock()
	fs.ios = &ios
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 5), 5*cs); err != nil { // batch N+1
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.log.mu.Lock()
		unwritten := s.log.unwritten
		s.log.mu.Unlock()
		if unwritten == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("batch N+1's copy was not written while batch N's log sync ran: no overlap")
		}
		time.Sleep(time.Millisecond)
	}
	fs.mu.Lock()
	seen := parseIOs(t, ios)
	fs.mu.Unlock()
	copied := false
	for _, e := range seen {
		if e.kind == "wstart" && e.name == logName {
			t.Fatalf("batch N+1 written to the log (%v) before batch N's sync returned", e)
		}
		if e.kind == "wstart" && e.name == v.dataName {
			t.Fatalf("data file written (%v) before batch N's sync returned", e)
		}
		copied = copied || e.kind == "wdone" && e.name == v.cowName
	}
	if !copied {
		t.Fatal("no COW-file write recorded for batch N+1's copy")
	}
	checkData := func(when string) {
		t.Helper()
		for _, c := range []int64{1, 5} {
			got := make([]byte, cs)
			if err := readFull(v.data, got, c*cs); err != nil {
				t.Fatal(err)
			}
			if want := old[c*cs : (c+1)*cs]; !bytes.Equal(got, want) {
				t.Fatalf("%s: data file chunk %d differs from the old chunk at %d", when, c, firstDiff(got, want))
			}
		}
	}
	checkData("while batch N's log sync runs")
	failLog.Store(true)
	h.let()
	if err := v.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after batch N's log sync failed: %v, want ErrClosed", err)
	}
	checkData("after batch N's log sync failed")
	s.Close()
	s2, err := openAfterInjectedFault(t, dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	sn, _ := s2.Snapshot("s")
	if got := mustRead(t, sn, 0, n*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d after reopen", firstDiff(got, old))
	}
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, n*cs); !bytes.Equal(got, old) {
		t.Fatalf("volume differs at %d after reopen (no write was durable)", firstDiff(got, old))
	}
	if err := s2.check(); err != nil {
		t.Fatal(err)
	}
}

// TestApplyFailureStopsLaterBatches: when writing batch N's images to a data
// file fails, batch N+1, already synced by then (the pipeline), must not be
// applied, and a Flush of N's write must fail. The apply stage used to go on
// with N+1 and move the applied mark past N, so the Flush returned nil for a
// write that never reached the data file.
func TestApplyFailureStopsLaterBatches(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs, n = 4096, 16
	old := map[string][]byte{}
	vols := map[string]*Volume{}
	for i, name := range []string{"v", "w"} {
		v := mustVol(t, s, name, n*cs, cs)
		old[name], vols[name] = fillRandom(t, v, int64(21+i)), v
		if _, err := s.CreateSnapshot(name, name+"-snap", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	v, w := vols["v"], vols["w"]
	vsnap, err := s.Snapshot("v-snap") // a reader's handle, kept across the failure
	if err != nil {
		t.Fatal(err)
	}
	isLog := func(name string) bool { return name == logName || name == logTmpName }
	var (
		logSyncs    atomic.Int32
		firstHeld   = make(chan struct{})
		releaseN    = make(chan struct{})
		secondSync  = make(chan struct{})
		releaseOnce sync.Once
	)
	t.Cleanup(func() { releaseOnce.Do(func() { close(releaseN) }) })
	fs.mu.Lock()
	fs.syncHook = func(name string) {
		if !isLog(name) {
			return
		}
		switch logSyncs.Add(1) {
		case 1: // batch N's log sync: hold it
			close(firstHeld)
			<-releaseN
		case 2: // batch N+1's
			close(secondSync)
		}
	}
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 1), 1*cs); err != nil { // batch N
		t.Fatal(err)
	}
	select {
	case <-firstHeld:
	case <-time.After(10 * time.Second):
		t.Fatal("batch N's log sync was never reached")
	}
	if _, err := w.WriteAt(fill(cs, 5), 5*cs); err != nil { // batch N+1
		t.Fatal(err)
	}
	// N's apply writes v's data file: hold it until N+1's log sync has
	// started (so N+1 is synced and on its way to the apply stage), then
	// fail it.
	fs.mu.Lock()
	fs.failSuffix, fs.failWrite = v.dataName, 0
	fs.writeHook = func(name string) {
		if name != v.dataName {
			return
		}
		select {
		case <-secondSync:
		case <-time.After(10 * time.Second):
		}
	}
	fs.mu.Unlock()
	releaseOnce.Do(func() { close(releaseN) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.log.mu.Lock()
		idle := s.log.inflight == 0 && !s.log.busy
		s.log.mu.Unlock()
		if idle {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the committer did not finish batches N and N+1")
		}
		time.Sleep(time.Millisecond)
	}
	if logSyncs.Load() < 2 {
		t.Fatalf("batch N+1 was not synced (%d log syncs): the test did not set up the overlap", logSyncs.Load())
	}
	fs.mu.Lock()
	injected := fs.failed
	fs.mu.Unlock()
	if injected != 1 {
		t.Fatalf("%d faults injected, want 1 (batch N's apply)", injected)
	}
	if err := v.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush of a write whose apply failed: %v, want ErrClosed", err)
	}
	got := make([]byte, cs)
	if err := readFull(w.data, got, 5*cs); err != nil {
		t.Fatal(err)
	}
	if want := old["w"][5*cs : 6*cs]; !bytes.Equal(got, want) {
		t.Fatalf("batch N+1 was applied after batch N's apply failed: w's data file chunk 5 differs from the old chunk at %d", firstDiff(got, want))
	}
	// Reads through open handles are still served: v's snapshot must read
	// its image, not the data file's chunk 1 that the failed apply half
	// overwrote. (Lookups by ID fail now: Store.Err.)
	got = make([]byte, vsnap.Size())
	if _, err := vsnap.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, old["v"]) {
		t.Fatalf("after the failed apply, the snapshot of v differs at %d", firstDiff(got, old["v"]))
	}
	if _, err := s.Snapshot("v-snap"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Snapshot lookup on a failed store: %v, want ErrClosed", err)
	}
	s.Close() // fails: the store's error is sticky
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for _, name := range []string{"v", "w"} {
		if got := readSnap(t, s2, name+"-snap"); !bytes.Equal(got, old[name]) {
			t.Fatalf("snapshot of %s differs at %d after reopen", name, firstDiff(got, old[name]))
		}
	}
}
