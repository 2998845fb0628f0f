package exceptions

import (
	"math/rand/v2"
	"sync"
	"testing"
)

// TestConcurrentReaders: the documented contract, readers concurrent
// with each other under a sync.RWMutex, mutations exclusive. Under -race it
// shows that Lookup, Ascend, Len, Runs, Bytes and Clone do not write.
func TestConcurrentReaders(t *testing.T) {
	x := New()
	rng := rand.New(rand.NewPCG(45, 1))
	for i := 0; i < 20000; i++ {
		o := Chunk(rng.Uint64N(1 << 16))
		x.Insert(o, Chunk(i)+2)
	}
	// A tail, too.
	for i := 0; i < 100; i++ {
		x.Insert(Chunk(1<<17+2*i), Chunk(1<<30+i))
	}
	var mu sync.RWMutex
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 2))
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				mu.RLock()
				c := Chunk(r.Uint64N(1<<17 + 300))
				x.Lookup(c)
				n := 0
				x.Ascend(c, func(Run) bool { n++; return n < 5 })
				_, _ = x.Len(), x.Runs()
				if k%200 == 0 {
					_ = x.Bytes()
					y := x.Clone()
					y.Lookup(c)
				}
				mu.RUnlock()
			}
		}(g)
	}
	for i := 0; i < 3000; i++ {
		mu.Lock()
		o := Chunk(rng.Uint64N(1 << 17))
		if i%3 == 0 {
			x.Remove(o, 1+rng.Uint64N(20))
		} else {
			x.Insert(o, Chunk(1<<40+i))
		}
		mu.Unlock()
	}
	close(stop)
	wg.Wait()
	if err := x.check(); err != nil {
		t.Fatal(err)
	}
}
