// Command foliocost measures what a 4 KiB buffered pwrite into an ext4 file
// costs in CPU, depending on how the file's page cache was filled (issue 4:
// the size of the page-cache folios a buffered write or a readahead leaves
// behind). No FUSE, no loop device: one thread, one file.
//
//	go run ./hack/foliocost -dir /var/tmp -size 1073741824 -writes 200000
//
// For each fill mode it creates a fresh sparse file, fills it, then does
// -writes random 4096-aligned 4 KiB pwrites (fixed seed) and prints the CPU
// time (utime+stime of the process) and wall time per write, then the CPU
// per GiB of one pass of 1 MiB pwrites and one of 1 MiB preads over the
// cached file (what the folio sizes cost sequential I/O). Fill modes:
//
//	w<N>    buffered pwrites of N KiB each (the folio order follows the
//	        write length)
//	w<N>s   the same, then fsync (clean folios)
//	ra      w1024s, page cache dropped (POSIX_FADV_DONTNEED), then read
//	        back with 1 MiB reads (readahead makes the folios); the fill
//	        figure is then the cold read rate
//	rar     ra with POSIX_FADV_RANDOM before the read-back (no readahead
//	        beyond each read; the fill figure is then the cold read rate)
//	split<N> 1 MiB buffers each written as 1 MiB/N KiB pwrites of N KiB
//	        (what FileBackend does)
//	vec<N>  1 MiB buffers each written as one pwritev of N KiB segments
//	        (checks that segments do not make smaller folios)
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	dir := flag.String("dir", "/var/tmp", "directory on the file system under test")
	size := flag.Int64("size", 1<<30, "file size in bytes")
	writes := flag.Int("writes", 200000, "random 4 KiB writes per mode")
	modes := flag.String("modes", "w1024 w256 w64 w16 w4 w1024s w64s ra split64 split16", "fill modes")
	flag.Parse()
	for _, m := range strings.Fields(*modes) {
		if err := run(*dir, *size, *writes, m); err != nil {
			fmt.Fprintln(os.Stderr, "foliocost:", err)
			os.Exit(1)
		}
	}
}

func cpu() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// pieceKiB parses a mode's piece size in KiB: one that cuts the 1 MiB
// buffer into whole pieces (a power of two from 1 to 1024).
func pieceKiB(mode, s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 || n > 1024 || 1024%n != 0 {
		return 0, fmt.Errorf("mode %q: the piece must divide 1024 KiB", mode)
	}
	return n, nil
}

func run(dir string, size int64, writes int, mode string) error {
	path := filepath.Join(dir, "foliocost.img")
	os.Remove(path)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, size); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	fill := func(piece int) error {
		for off := int64(0); off < size; off += int64(len(buf)) {
			for p := 0; p < len(buf); p += piece {
				if _, err := unix.Pwrite(fd, buf[p:p+piece], off+int64(p)); err != nil {
					return err
				}
			}
		}
		return nil
	}
	t0 := time.Now()
	switch {
	case mode == "ra" || mode == "rar":
		if err := fill(1 << 20); err != nil {
			return err
		}
		unix.Fsync(fd)
		if err := unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED); err != nil {
			return err
		}
		if mode == "rar" {
			if err := unix.Fadvise(fd, 0, 0, unix.FADV_RANDOM); err != nil {
				return err
			}
		}
		t0 = time.Now()
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := unix.Pread(fd, buf, off); err != nil {
				return err
			}
		}
	case strings.HasPrefix(mode, "vec"):
		n, err := pieceKiB(mode, strings.TrimPrefix(mode, "vec"))
		if err != nil {
			return err
		}
		var iov [][]byte
		for p := 0; p < len(buf); p += n << 10 {
			iov = append(iov, buf[p:p+n<<10])
		}
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := unix.Pwritev(fd, iov, off); err != nil {
				return err
			}
		}
	case strings.HasPrefix(mode, "split"):
		n, err := pieceKiB(mode, strings.TrimPrefix(mode, "split"))
		if err != nil {
			return err
		}
		if err := fill(n << 10); err != nil {
			return err
		}
	case strings.HasPrefix(mode, "w"):
		s := strings.TrimPrefix(mode, "w")
		sync := strings.HasSuffix(s, "s")
		n, err := pieceKiB(mode, strings.TrimSuffix(s, "s"))
		if err != nil {
			return err
		}
		if err := fill(n << 10); err != nil {
			return err
		}
		if sync {
			unix.Fsync(fd)
		}
	default:
		return fmt.Errorf("unknown mode %q", mode)
	}
	fillT := time.Since(t0)
	rng := rand.New(rand.NewPCG(42, 42))
	blocks := size / 4096
	w := buf[:4096]
	c0, t1 := cpu(), time.Now()
	for i := 0; i < writes; i++ {
		if _, err := unix.Pwrite(fd, w, rng.Int64N(blocks)*4096); err != nil {
			return err
		}
	}
	c1, t2 := cpu(), time.Now()
	// Sequential 1 MiB rewrite and read of the cached file: what the
	// folios left by the fill cost the sequential jobs.
	pass := func(write bool) (time.Duration, error) {
		c := cpu()
		for off := int64(0); off < size; off += int64(len(buf)) {
			var err error
			if write {
				_, err = unix.Pwrite(fd, buf, off)
			} else {
				_, err = unix.Pread(fd, buf, off)
			}
			if err != nil {
				return 0, err
			}
		}
		return cpu() - c, nil
	}
	rw, err := pass(true)
	if err != nil {
		return err
	}
	rr, err := pass(false)
	if err != nil {
		return err
	}
	gib := float64(size) / (1 << 30)
	fmt.Printf("%-8s fill %6.0f MB/s   4k write: cpu %5.2f us  wall %5.2f us   cached 1M rewrite %4.0f ms/GiB  read %4.0f ms/GiB\n", mode,
		float64(size)/fillT.Seconds()/1e6,
		float64(c1-c0)/float64(writes)/1e3, float64(t2.Sub(t1))/float64(writes)/1e3,
		float64(rw.Milliseconds())/gib, float64(rr.Milliseconds())/gib)
	return nil
}
