package node

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// TestMappedBeforeAttachReported: a file some process maps shared and
// writable when the capture attaches is reported whole, as sys_enter_mmap
// reports a new mapping (its pages may be dirty already, and a store into
// a dirty page faults no more: a review found such stores never
// replicated); a private or read-only mapping, or a file on another
// device, is not.
func TestMappedBeforeAttachReported(t *testing.T) {
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "ext4", 64)
	other := loopfs.Make(t, "ext4", 64)
	mapFile := func(dir, name string, prot, flags int) (ino uint64) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, make([]byte, 3*4096+10), 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b, err := unix.Mmap(int(f.Fd()), 0, 3*4096+10, prot, flags)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(b) })
		if prot&unix.PROT_WRITE != 0 {
			b[5000] = 'x' // a dirty page: later stores into it do not fault
		}
		var st unix.Stat_t
		unix.Stat(p, &st)
		return st.Ino
	}
	shared := mapFile(fs.Mount, "shared", unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	mapFile(fs.Mount, "private", unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	mapFile(fs.Mount, "readonly", unix.PROT_READ, unix.MAP_SHARED)
	mapFile(other.Mount, "elsewhere", unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	var st unix.Stat_t
	if err := unix.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	var got []capture.Record
	n := mappedFiles([]uint64{st.Dev}, func(r *capture.Record) { got = append(got, *r) })
	if n != 1 || len(got) != 1 {
		t.Fatalf("%d files reported (%+v), want the one mapped shared and writable on the watched device", n, got)
	}
	r := got[0]
	if r.Ino != shared || r.Dev != capture.KernelDev(st.Dev) || r.Kind != capture.KindMmap || r.Pos != 0 || r.Len != 3*4096+10 {
		t.Errorf("reported %+v, want the whole of inode %d (mmap, 0, %d)", r, shared, 3*4096+10)
	}
}
