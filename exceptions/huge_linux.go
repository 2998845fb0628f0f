package exceptions

import (
	"syscall"
	"unsafe"
)

// Advice values from asm-generic/mman-common.h that package syscall does
// not name.
const (
	madvHugepage = 14 // MADV_HUGEPAGE
	madvCollapse = 25 // MADV_COLLAPSE (Linux 6.1)
)

// hugeAdvise asks the kernel to back the 2 MiB-aligned interior of s with
// huge pages: MADV_HUGEPAGE marks the range (transparent huge pages are
// often in "madvise" mode, so Go's heap gets none by itself), and
// MADV_COLLAPSE makes them now even if the runtime already faulted the
// memory in with 4 KiB pages when it zeroed the slab. Both are advice: an
// error (an older kernel, THP disabled) leaves ordinary pages, which are
// only slower, so it is ignored.
func hugeAdvise(s []uint64) {
	const huge = 2 << 20
	lo := uintptr(unsafe.Pointer(&s[0]))
	hi := lo + uintptr(len(s))*8
	a, b := (lo+huge-1)&^(huge-1), hi&^(huge-1)
	if b <= a {
		return
	}
	// The whole slab is marked (it is page-aligned: a large Go object), so
	// that an aligned 2 MiB range straddling two consecutive slabs, which
	// the heap usually places back to back, qualifies too; the interior is
	// collapsed now.
	if syscall.Madvise(unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), hi-lo), madvHugepage) == nil {
		_ = syscall.Madvise(unsafe.Slice((*byte)(unsafe.Pointer(&s[(a-lo)/8])), b-a), madvCollapse)
	}
}
