package exceptions_test

import (
	"errors"
	"fmt"

	"github.com/csi-snap/csi-snap/exceptions"
)

func Example() {
	x := exceptions.New()
	// Chunks 10, 11 and 12 of the origin were copied out to COW chunks 0..2,
	// written out of order; they still end up as one run.
	_ = x.Insert(12, 2)
	_ = x.Insert(10, 0)
	_ = x.Insert(11, 1)
	// A long run inserted at once.
	_ = x.InsertRun(exceptions.Run{Origin: 1000, COW: 3, Len: 1 << 20})

	if err := x.Insert(11, 9); errors.Is(err, exceptions.ErrMapped) {
		fmt.Println("chunk 11 is already copied out")
	}
	cow, ok := x.Lookup(11)
	fmt.Println("chunk 11 ->", cow, ok)
	_, ok = x.Lookup(13)
	fmt.Println("chunk 13 mapped:", ok)

	fmt.Println(x.Runs(), "runs,", x.Len(), "chunks")
	x.Ascend(0, func(r exceptions.Run) bool {
		fmt.Printf("[%d, %d) -> %d\n", r.Origin, uint64(r.Origin)+r.Len, r.COW)
		return true
	})

	// Unmapping the middle of a run splits it.
	fmt.Println("removed", x.Remove(11, 1))
	fmt.Println(x.Runs(), "runs")
	// Output:
	// chunk 11 is already copied out
	// chunk 11 -> 1 true
	// chunk 13 mapped: false
	// 2 runs, 1048579 chunks
	// [10, 13) -> 0
	// [1000, 1049576) -> 3
	// removed 1
	// 3 runs
}
