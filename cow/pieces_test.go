package cow

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"testing"
)

// recWriter records every WriteAt into a byte model; failAt makes the
// write at that position fail (or write short).
type recWriter struct {
	img    []byte
	calls  [][2]int64
	failAt int64
	short  bool
}

func (w *recWriter) WriteAt(p []byte, off int64) (int, error) {
	w.calls = append(w.calls, [2]int64{off, int64(len(p))})
	if off == w.failAt {
		if w.short {
			copy(w.img[off:], p[:1])
			return 1, nil
		}
		return 0, errors.New("injected")
	}
	copy(w.img[off:], p)
	return len(p), nil
}

func TestWriteAtPieces(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	const size = 4 << 20
	for i := 0; i < 200; i++ {
		off := rng.Int63n(size / 2)
		p := make([]byte, 1+rng.Intn(size/2-1))
		rng.Read(p)
		w := &recWriter{img: make([]byte, size), failAt: -1}
		want := make([]byte, size)
		copy(want[off:], p)
		n, err := writeAtPieces(w, p, off, writePiece)
		if err != nil || n != len(p) {
			t.Fatalf("write %d at %d: n=%d err=%v", len(p), off, n, err)
		}
		if !bytes.Equal(w.img, want) {
			t.Fatalf("write %d at %d: image differs", len(p), off)
		}
		for _, c := range w.calls {
			// A write of at most one piece goes as it is; longer ones are cut
			// at multiples of the piece.
			if c[1] > writePiece || len(p) > writePiece && c[0]/writePiece != (c[0]+c[1]-1)/writePiece {
				t.Fatalf("piece [%d,+%d) crosses a %d boundary", c[0], c[1], writePiece)
			}
		}
	}
	// An error or a short write stops the loop and counts what was written.
	for _, short := range []bool{false, true} {
		w := &recWriter{img: make([]byte, size), failAt: writePiece, short: short}
		n, err := writeAtPieces(w, make([]byte, 3*writePiece), 0, writePiece)
		wantN := writePiece
		if short {
			wantN++
			if !errors.Is(err, io.ErrShortWrite) {
				t.Fatalf("short write: err=%v", err)
			}
		} else if err == nil {
			t.Fatal("failed write: no error")
		}
		if n != wantN || len(w.calls) != 2 {
			t.Fatalf("short=%v: n=%d calls=%d, want n=%d after 2 calls", short, n, len(w.calls), wantN)
		}
	}
}
