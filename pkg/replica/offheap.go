package replica

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// region is memory for data without Go pointers that grows with the
// tree's file count (the shadow's records, tables and names). Up to
// mapAt bytes it is on the Go heap; beyond, it is mapped anonymously
// outside it, so that the collector's goal (twice the live heap by
// default) is not twice the shadow too: at a million files the shadow
// is about 62 MiB, and in the heap it let the daemon grow to twice that
// before a collection. A mapped region is unmapped by free, or by the
// cleanup of whatever owns it (see shadowMem).
type region struct {
	b      []byte
	mapped bool
}

// mapAt is the size from which a region is mapped outside the heap.
var mapAt = 1 << 20

// resize makes the region n bytes or more, keeping its contents; what
// it adds reads as zeros.
func (r *region) resize(n int) {
	if n <= len(r.b) {
		return
	}
	if !r.mapped && n <= mapAt {
		w := make([]uint64, (n+7)/8)
		b := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(w))), len(w)*8)
		copy(b, r.b)
		r.b = b
		return
	}
	page := os.Getpagesize()
	size := (n + page - 1) / page * page
	if r.mapped {
		b, err := unix.Mremap(r.b, size, unix.MREMAP_MAYMOVE)
		if err != nil {
			panic(fmt.Sprintf("replica: growing the shadow to %d bytes: %v", size, err))
		}
		r.b = b
		return
	}
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		panic(fmt.Sprintf("replica: mapping %d bytes for the shadow: %v", size, err))
	}
	copy(b, r.b)
	r.b, r.mapped = b, true
}

// free lets the region's memory go; it reads as empty after.
func (r *region) free() {
	if r.mapped {
		unix.Munmap(r.b)
	}
	r.b, r.mapped = nil, false
}

// regionSlice is the region's memory as a slice of T, a type without
// pointers whose alignment is at most 8.
func regionSlice[T any](r *region) []T {
	var t T
	n := len(r.b) / int(unsafe.Sizeof(t))
	if n == 0 {
		return nil
	}
	return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(r.b))), n)
}
