//go:build !linux

package exceptions

// hugeAdvise does nothing where madvise's huge-page advice is not known.
func hugeAdvise([]uint64) {}
