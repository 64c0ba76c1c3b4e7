package capture

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// From a second review (forty-first session) of d0aac90.

// reportsRange: a data, mmap or preop record of ino covers [off, end) (a
// record whose end wraps counts as reaching the end of the file).
func reportsRange(recs []Record, ino, off, end uint64) bool {
	for _, r := range recs {
		if r.Ino != ino || (r.Kind != KindData && r.Kind != KindMmap && r.Kind != KindPreop) {
			continue
		}
		e := r.Pos + r.Len
		if e < r.Pos {
			e = ^uint64(0)
		}
		if r.Pos <= off && e >= end {
			return true
		}
	}
	return false
}

// TestCaptureBtrfsRangeLockAboveTwoPow62: btrfs_range_locked caps a
// range at 1<<62: `if (len > 1<<62 || start > (1<<62) - len) len =
// (1<<62) - start`. For a range that starts above 1<<62 (a sparse file on
// btrfs may be up to 2^63-1 bytes) len wraps to nearly 2^64 and
// start + len to 1<<62, below start: data() (madvise, kernel workers,
// io-wq, 32-bit) then loops `if (pos >= end) return` and emits nothing.
// The code before (cut at i_size) reported it. A punch through
// MADV_REMOVE of data written there is lost: the peer keeps the bytes.
func TestCaptureBtrfsRangeLockAboveTwoPow62(t *testing.T) {
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	rec := newRecorder(c)
	const base = int64(1)<<62 + 1<<20
	const blk = 64 << 10
	f, err := os.OpenFile(filepath.Join(fs.Mount, "sparse"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, blk)
	for i := range buf {
		buf[i] = 'x'
	}
	if _, err := f.WriteAt(buf, base); err != nil {
		t.Skipf("a write at %d: %v", base, err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), base, blk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Skipf("mmap at %d: %v", base, err)
	}
	defer unix.Munmap(m)
	ino := inoOf(t, f.Name())
	settle(t, c, rec)
	if err := unix.Madvise(m, unix.MADV_REMOVE); err != nil {
		t.Fatalf("madvise(MADV_REMOVE): %v", err)
	}
	var st unix.Stat_t
	unix.Fstat(int(f.Fd()), &st)
	recs := settle(t, c, rec)
	if !reportsRange(recs, ino, uint64(base), uint64(base)+blk) {
		t.Fatalf("MADV_REMOVE of [2^62+1MiB, +64KiB) (size %d, %d blocks left): not reported; records: %v", st.Size, st.Blocks, recs)
	}
}
